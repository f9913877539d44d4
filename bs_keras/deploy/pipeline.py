"""`export(model, out, ...)`: a trained model to a directory of deployable files, checked for parity.

```python
from bs_keras import deploy

result = deploy.export("runs/demo/best.keras", "exported/demo", format="tflite",
                       quantize=["none", "dynamic"], calibration="fashion_mnist")
print(result.table())           # parity of every exported variant with Keras inference
```

The modes, formats and the files written are listed in `bs_keras.deploy.options`.
"""

import dataclasses
import json
import os
import shutil
import time

import keras
import numpy as np

import bs_keras
from bs_keras.deploy import calibration as calib_lib
from bs_keras.deploy import compact as compact_lib
from bs_keras.deploy import conditional as cond_lib
from bs_keras.deploy import conditional_serving as serving_lib
from bs_keras.deploy import parity, savedmodel, tflite
from bs_keras.deploy.options import (
    COND_FRACTIONS, DEFAULT_MAX_WIDTHS, ExportError, check_options, has_calibration, parse_outputs, parse_quantize,
)
from bs_keras.io_utils import atomic_path
from bs_keras.macs import count_macs


@dataclasses.dataclass
class ExportResult:
    """What `export` returns: the parity table (as parity.json) and export.json.

    Attributes:
        out: the output directory (absolute path).
        rows: one `bs_keras.deploy.parity.ParityRow` per exported variant
            (name, max_abs_diff, top1_agreement, gate_agreement, mean_macs,
            size_bytes, latency_ms), compared with Keras inference.
        samples: the number of images the table was measured on.
        source: where they came from (the calibration data, or seeded
            N(0, 1) inputs without calibration).
        summary: the contents of export.json.
    """

    out: str
    rows: list
    samples: int
    source: str
    summary: dict

    def table(self):
        """The parity table as Markdown (what the export logs)."""
        return parity.format_table(self.rows)

    def row(self, name):
        """The row of the variant `name` (e.g. "saved_model", "tflite dynamic")."""
        return next(r for r in self.rows if r.name == name)


class _Log:
    """Passes each line to `echo` (unless None) and keeps it for export_log.txt."""

    def __init__(self, echo):
        self.echo = echo
        self.lines = []

    def __call__(self, text=""):
        if self.echo is not None:
            self.echo(text)
        self.lines.extend(str(text).split("\n"))

    def text(self):
        return "\n".join(self.lines) + "\n"


def _print(text):
    print(text, flush=True)


def export(model, out, *, mode="masked", format="saved_model", quantize="none", calibration=None,
           calibration_samples=256, round_to=None, widths=None, max_widths=None, xla=False, outputs=None,
           parity_samples=128, latency_runs=20, threads=2, data_dir=None, manual_dir=None,
           overwrite=False, log=_print):
    """Exports `model` into the directory `out` and measures its parity with Keras.

    Args:
        model: a `keras.Model`, or the path of a `.keras` file.
        out: the output directory; must not exist unless `overwrite`.
        mode: "masked" (the model as trained), "compact" (always-off channels
            removed, measured on the calibration data) or "conditional"
            (per-block branches between precompiled widths).
        format: "saved_model" or "tflite".
        quantize: TFLite quantizations, a list or comma-separated string of
            "none", "float16", "dynamic", "int8" (one .tflite file each).
        calibration: a dataset name, a folder of images, a `.npy` file of
            preprocessed float32 images, or such an array (see
            `bs_keras.deploy.calibration`). Needed by "compact",
            "conditional" and "int8"; also the parity images.
        calibration_samples: at most this many calibration images.
        round_to: "compact": keep widths a multiple of this.
        widths: "conditional": "auto" (default: at most `max_widths` widths
            fitted to the calibration data, plus the full width),
            "quarters" or "eighths" (fixed fractions of each block).
        max_widths: "conditional", widths "auto": widths per block besides
            the full one (default 6).
        xla: "conditional", "saved_model": compile the serving functions
            with XLA.
        outputs: "conditional": the model outputs to export, a list or
            comma-separated string of names (default: the first, e.g. a
            PSPNet's "seg" without its auxiliary head; "seg,aux" keeps both).
            The other modes export every output.
        parity_samples: images in the parity table (calibration images,
            else seeded N(0, 1) inputs).
        latency_runs: batch-1 calls timed per variant (0: none).
        threads: LiteRT interpreter threads.
        data_dir, manual_dir: TFDS data directory and source archives, for
            a dataset name as `calibration`.
        overwrite: replace an existing `out` directory.
        log: called with each progress line (default `print`; None:
            silent); the lines are also written to export_log.txt.

    Returns:
        An `ExportResult`: the parity table and the export.json summary.

    Raises:
        bs_keras.deploy.options.OptionError (a ValueError): bad options,
            before anything is loaded.
        ExportError: a model that does not load, a failed conversion, random
            ops in the exported graph. `ValueError` / `FileNotFoundError`:
            unusable calibration data or an unsupported model. Nothing is
            left in `out`'s place on failure.
    """
    quantize = parse_quantize(quantize if isinstance(quantize, str) else ",".join(quantize))
    if isinstance(outputs, str):
        outputs = parse_outputs(outputs)
    check_options(model, out, format=format, mode=mode, quantize=quantize, calibration=calibration,
                  round_to=round_to, widths=widths, max_widths=max_widths, xla=xla, outputs=outputs,
                  overwrite=overwrite)
    run = _Run(
        out=os.fspath(out), mode=mode, format=format, quantize=quantize if format == "tflite" else ["none"],
        round_to=round_to, widths=COND_FRACTIONS.get(widths, "auto"),
        max_widths=max_widths or DEFAULT_MAX_WIDTHS, xla=bool(xla),
        outputs=None if outputs is None else list(outputs), parity_samples=parity_samples,
        latency_runs=latency_runs, threads=threads, log=_Log(log),
    )
    return run.export(model, calibration, calibration_samples, data_dir, manual_dir)


def _load_model(path):
    bs_keras.register_custom_objects()
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # corrupt zip, unknown layer, not a model, ...
        raise ExportError(f"cannot load {path!r} as a Keras model: {type(e).__name__}: {e}") from e
    if not isinstance(model, keras.Model):
        raise ExportError(f"{path!r} does not hold a Keras model.")
    return model


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_no_random_ops(loaded):
    found = savedmodel.random_ops(loaded)
    if found:
        raise ExportError(f"the exported graph contains random ops {found}; refusing to export")


@dataclasses.dataclass
class _Calibration:
    """The calibration images of a run and what export.json and the logs say of them."""

    images: np.ndarray | None = None
    name: str | None = None  # the source as given: dataset name or path
    mean: tuple | None = None
    std: tuple | None = None

    @classmethod
    def load(cls, source, input_shape, n, data_dir, manual_dir):
        if not has_calibration(source):
            return cls()
        if not isinstance(source, (str, os.PathLike)):
            return cls(np.asarray(source, np.float32)[:n])
        found = calib_lib.read_calibration(source, input_shape, n=n, data_dir=data_dir, manual_dir=manual_dir)
        return cls(found.images, os.fspath(source), found.mean, found.std)

    @property
    def described(self):
        """How the log, compaction.json and parity.json name the source."""
        return repr(self.name) if self.name is not None else "the calibration array"

    def preprocessing(self):
        """A description of the expected input normalization, for export.json."""
        out = {
            "description": "float32 NHWC images: pixels scaled to [0, 1], minus the training dataset's "
            "per-channel mean, divided by its std (bs_keras.data)"
        }
        if self.mean is not None:
            out["calibration_dataset"] = self.name
            out["mean"], out["std"] = [float(v) for v in self.mean], [float(v) for v in self.std]
        return out


@dataclasses.dataclass
class _Run:
    """One export: its resolved options; while it runs, the temporary directory and what is in it."""

    out: str
    mode: str
    format: str
    quantize: list
    round_to: int | None
    widths: object
    max_widths: int
    xla: bool
    outputs: list | None
    parity_samples: int
    latency_runs: int
    threads: int
    log: _Log
    calibration: _Calibration = None
    head: dict = None  # export.json fields every mode shares
    result: ExportResult = None  # made by `_parity`
    tmp: str | None = None
    files: list = dataclasses.field(default_factory=list)
    variants: list = dataclasses.field(default_factory=list)

    def export(self, model, calibration, calibration_samples, data_dir, manual_dir):
        start = time.time()
        model_path = None
        if not isinstance(model, keras.Model):
            model_path = os.fspath(model)
            model = _load_model(model_path)
        spec = savedmodel.input_spec(model)
        where = f"{model_path}: " if model_path else ""
        self.log(f"model      {where}'{model.name}', input {savedmodel.describe_spec(spec)}, "
                 f"{model.count_params():,} parameters")  # fmt: skip
        if self.mode == "conditional":
            problems = cond_lib.support_problems(model, self.outputs)
            if problems:  # before loading calibration data or writing anything
                raise ExportError(cond_lib.refusal(problems))
        self.calibration = _Calibration.load(calibration, spec.shape, calibration_samples, data_dir, manual_dir)
        if self.calibration.images is not None:
            self.log(f"calibration {len(self.calibration.images)} images from {self.calibration.described}")
        self.head = {
            "model": os.path.abspath(model_path) if model_path else model.name,
            "format": self.format,
            "mode": self.mode,
            "quantize": self.quantize,
        }
        out = os.path.abspath(self.out)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with atomic_path(out) as tmp:
            self.tmp = tmp
            os.mkdir(tmp)
            if self.mode == "conditional":
                summary = self._conditional(model, spec)
            else:
                summary = self._masked_or_compact(model, spec)
            _write_json(os.path.join(tmp, "export.json"), summary)
            self.log(f"\nwrote {self.out} ({', '.join(summary['files'])}) in {time.time() - start:.1f} s")
            with open(os.path.join(tmp, "export_log.txt"), "w") as f:
                f.write(self.log.text())
        self.result.out, self.result.summary = out, summary
        return self.result

    def _input(self, shape):
        """export.json's `input`: name, dtype, shape and preprocessing of every signature's input."""
        return {
            "name": savedmodel.INPUT_NAME,
            "dtype": "float32",
            "shape": shape,
            "preprocessing": self.calibration.preprocessing(),
        }

    def _done_files(self):
        return self.files + ["export.json", "export_log.txt"]

    # --- masked and compact ---

    def _masked_or_compact(self, model, spec):
        exported, expand = model, None
        if self.mode == "compact":
            exported, expand = self._compact(model)
            self.variants.append(("keras compact", parity.KerasRunner(exported), {"expand": expand}))
        sm_dir = os.path.join(self.tmp, "saved_model")
        savedmodel.export_saved_model(exported, sm_dir)
        runner = savedmodel.SavedModelRunner(sm_dir)
        _check_no_random_ops(runner.loaded)
        self.variants.append(("saved_model", runner, {"expand": expand}))
        if self.format == "saved_model":
            self.files.append("saved_model")
            self.log(f"saved_model signatures {', '.join(savedmodel.SIGNATURES)}")
        else:
            images = self.calibration.images
            for q in self.quantize:
                runner, size = self._write_tflite(
                    lambda q=q: tflite.convert_saved_model(sm_dir, q, representative_images=images), q
                )
                self.variants.append((f"tflite {q}", runner, {"expand": expand, "size_bytes": size}))
        self._parity(model, spec)
        functions = savedmodel.ServingFunctions(exported)
        with_gates = [*functions.output_names, *(g.name for g in functions.gates)]
        if functions.static_macs is not None:
            with_gates.append(savedmodel.MACS_OUTPUT)
        summary = {
            **self.head,
            "input": self._input([None if d is None else int(d) for d in spec.shape]),
            "signatures": {
                savedmodel.SERVING_DEFAULT: functions.output_names,
                savedmodel.SERVING_WITH_GATES: with_gates,
            },
            "static_macs": functions.static_macs,
            "files": self._done_files(),
        }
        if self.format == "tflite":
            shutil.rmtree(sm_dir)
        return summary

    def _compact(self, model):
        """Compacts `model`, writes compact.keras and compaction.json; returns the
        compact model and the function expanding its gate masks to the original layout."""
        images = self.calibration.images
        compact, plans = compact_lib.compact_model(model, images, round_to=self.round_to, return_plan=True)
        compact.save(os.path.join(self.tmp, "compact.keras"))
        params = [int(model.count_params()), int(compact.count_params())]
        macs = [int(count_macs(model)), int(count_macs(compact))]
        summary = {
            "calibration": self.calibration.name,
            "calibration_samples": int(len(images)),
            "round_to": self.round_to,
            "params": params,
            "static_macs": macs,
            "gates": [p.summary() for p in plans],
        }
        _write_json(os.path.join(self.tmp, "compaction.json"), summary)
        self.files += ["compact.keras", "compaction.json"]
        self.log(f"compact    {params[0]:,} -> {params[1]:,} parameters, "
                 f"{macs[0] / 1e6:.2f} -> {macs[1] / 1e6:.2f} M static MACs")  # fmt: skip
        for s in summary["gates"]:
            removed = "" if s["gate_kept"] else ", gate removed"
            self.log(f"  {s['gate']:<24} on/cond/off {s['always_on']}/{s['conditional']}/{s['always_off']}"
                     f" -> {s['new_channels']} channels{removed}")  # fmt: skip

        def expand(masks, n):
            return compact_lib.expand_gate_masks(plans, masks, n)

        return compact, expand

    # --- conditional ---

    def _conditional(self, model, spec):
        images = self.calibration.images
        module = cond_lib.conditional_model(model, images, widths=self.widths, max_widths=self.max_widths,
                                            jit_compile=self.xla, outputs=self.outputs)
        if module.output_names != tuple(savedmodel.output_names(model)):
            self.log(f"outputs    {', '.join(module.output_names)} (not exported: "
                     f"{', '.join(n for n in savedmodel.output_names(model) if n not in module.output_names)})")
        # The reference is the part of the model that was exported (its MACs without a dropped head).
        model = cond_lib.exported_part(model, module.output_names)
        batch1, any_batch = [1, *spec.shape[1:]], [None, *spec.shape[1:]]
        if self.format == "saved_model":
            sm_dir = os.path.join(self.tmp, "saved_model")
            module.save(sm_dir)
            runner = serving_lib.ConditionalRunner(sm_dir)
            _check_no_random_ops(runner.loaded)
            self.files.append("saved_model")
            self.variants.append(("saved_model", runner, {}))
            signatures = {
                serving_lib.SERVING_DEFAULT: batch1,
                serving_lib.SERVING_BATCH: any_batch,
                serving_lib.SERVING_WITH_GATES: any_batch,
            }
            self.log(f"saved_model signatures {', '.join(signatures)} (conditional{', XLA' if self.xla else ''})")
        else:
            self.variants.append(("tf conditional", serving_lib.ConditionalRunner(module), {}))
            signatures = {serving_lib.SERVING_DEFAULT: batch1, serving_lib.SERVING_WITH_GATES: batch1}
            for q in self.quantize:
                runner, size = self._write_tflite(lambda q=q: module.to_tflite(q, with_gates=True), q,
                                                  what=", conditional")
                self.variants.append((f"tflite {q}", runner, {"size_bytes": size}))

        parity_images = images[: self.parity_samples]
        info = serving_lib.describe(module, parity_images, calibration_samples=len(images))
        _write_json(os.path.join(self.tmp, "conditional.json"), info)
        self.files.append("conditional.json")
        self.log(f"conditional {len(info['gates'])} gated blocks, widths "
                 + "; ".join(f"{g['gate']} {g['widths']}" for g in info["gates"][:3])
                 + ("; ..." if len(info["gates"]) > 3 else "")
                 + f"\n           executed MACs at batch 1 on {len(parity_images)} samples: "
                 f"{info['mean_executed_mac_ratio']:.3f} of {info['static_macs'] / 1e6:.2f} M static")  # fmt: skip
        self._parity(model, spec)
        outputs = list(module.output_names)
        with_gates = [*outputs, *module.gate_names, serving_lib.EXECUTED_MACS, serving_lib.WIDTHS]
        return {
            **self.head,
            "input": self._input(batch1),
            "signatures": {
                name: {
                    "input_shape": shape,
                    "outputs": with_gates if name == serving_lib.SERVING_WITH_GATES else outputs,
                }
                for name, shape in signatures.items()
            },
            "static_macs": int(module.static_macs),
            "files": self._done_files(),
        }

    # --- shared ---

    def _write_tflite(self, convert, quantize, what=""):
        """Runs `convert()`, writes the .tflite; returns (runner, size in bytes)."""
        start = time.time()
        try:
            flatbuffer = convert()
        except ValueError:
            raise
        except Exception as e:  # converter errors have many types
            raise ExportError(f"TFLite conversion ({quantize}{what}) failed: {type(e).__name__}: {e}") from e
        name = tflite.tflite_filename(quantize)
        with open(os.path.join(self.tmp, name), "wb") as f:
            f.write(flatbuffer)
        self.files.append(name)
        self.log(f"tflite     {name}: {len(flatbuffer) / 1024:.0f} KiB in {time.time() - start:.1f} s"
                 + (f" ({what.strip(', ')})" if what else ""))
        return tflite.TFLiteRunner(flatbuffer, num_threads=self.threads), len(flatbuffer)

    def _parity(self, model, spec):
        """Measures, logs and writes (parity.json) the parity table into `self.result`."""
        if self.calibration.images is not None:
            images, source = self.calibration.images[: self.parity_samples], self.calibration.described
        else:
            rng = np.random.default_rng(0)
            images = rng.standard_normal((self.parity_samples, *spec.shape[1:])).astype(np.float32)
            source = "seeded N(0, 1) inputs (no --calibration)"
        rows = parity.parity_rows(model, images, self.variants, latency_runs=self.latency_runs)
        self.log(f"\nparity with Keras inference of '{model.name}' on {len(images)} samples from {source}:")
        self.log(parity.format_table(rows))
        _write_json(
            os.path.join(self.tmp, "parity.json"),
            {"samples": int(len(images)), "source": source, "rows": [r.as_dict() for r in rows]},
        )
        self.files.append("parity.json")
        self.result = ExportResult(out=None, rows=rows, samples=int(len(images)), source=source, summary=None)
