"""Inference latency of dense / masked / compact / conditional gated ResNets, one run.

Times ResNet-50 at 224x224 and CIFAR ResNet-20 at 32x32 (with `--models psp`
the gated PSPNet-50 at a Cityscapes-like 512x512, 19 classes; with
`--models trained`, a model trained by train.py) with a synthetic gate pattern
whose mean conditional MACs are ~45% of the dense model's: the dense ResNet,
the gated model as trained (masked), its compaction, conditional execution
with precompiled widths (quarters, eighths, fitted `auto` widths), and a
static narrow reference with the same MACs plus its gated diagnostic, all as
BN-folded TF functions (optionally XLA-compiled) and in LiteRT fp32 and
dynamic range, at batch 1 (and 32 in TF), calls interleaved, ratios paired
per call against dense. What each variant is, how the timing works, and the
measured figures: docs/LATENCY.md.

    python bench/latency.py [--quick] [--models r50,r20] [--rounds 15] [--pattern nested|independent]
        [--variants dense,masked,compact,cond4,cond8,cond,cond8ch,narrow,narrow+g]   (default all but cond8ch; --quick: no narrow*)
        [--xla] [--group-sizes 8]
    python bench/latency.py --xla --group-sizes 8        # the run in docs/LATENCY.md
    python bench/latency.py --models trained --model-path runs/fashion_mnist_demo/best.keras
    python bench/latency.py --models psp --xla --rounds 3 --images 2 --calibration 8 \
        --variants dense,masked,compact,cond,narrow,narrow+g          # PSPNet-50 at 512x512
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

TARGET = 0.45  # mean conditional MAC ratio of the synthetic pattern
VARIANTS = ("dense", "masked", "compact", "cond4", "cond8", "cond", "cond8ch", "narrow", "narrow+g")
# Precompiled widths per variant, as fractions of each gated width (rounded
# up to multiples of 8): quarters, eighths, and every multiple of 8 channels.
COND_WIDTHS = {"cond4": (0.25, 0.5, 0.75, 1.0), "cond8": [i / 8 for i in range(1, 9)],
               "cond": "auto", "cond8ch": [i / 512 for i in range(1, 513)]}
# With --xla, timed under XLA too (FoldedModel(jit_compile=True): nested tf.cond
# branches; XLA did not finish compiling the switch_case R50 module in 5
# minutes, the nested-cond one compiles in ~10 s): the baseline, the
# references, the CLI's conditional default and its gate-group rows.
XLA_VARIANTS = ("dense", "narrow", "narrow+g", "cond")
COND_FRACTION = 0.3  # input-dependent channels per gate, open ~half the time
PSP_SIZE, PSP_WIDTH = 512, 1.0  # --models psp: the gated PSPNet-50 (set by --psp-size, --psp-width)


def build(kind, seed=0, model_path=None, group_size=1):
    import keras

    from bs_keras.models import cifar_resnet, imagenet_resnet

    keras.utils.set_random_seed(seed)
    if kind == "trained":
        from bs_keras.training.tasks import make_task

        recipe = trained_recipe(model_path)
        gated = keras.models.load_model(model_path)
        dense = make_task(recipe.replace(gated=False)).build()
        for layer in dense.layers:
            if layer.weights:
                layer.set_weights(gated.get_layer(layer.name).get_weights())
        # What the export runs: the first output (a PSPNet's `seg`; its auxiliary head is not exported).
        return first_output(dense), first_output(gated)
    if kind == "r50":
        dense = imagenet_resnet(50, gated=False)
        gated = imagenet_resnet(50, gated=True, gate_kwargs={"group_size": group_size})
    elif kind == "psp":
        from bs_keras.segmentation import pspnet

        # Cityscapes-like: 19 classes, PSP_SIZE x PSP_SIZE crops, no auxiliary head (dropped at export).
        kwargs = dict(num_classes=19, input_shape=(PSP_SIZE, PSP_SIZE, 3), aux=False, width_multiplier=PSP_WIDTH)
        dense = pspnet(gated=False, **kwargs)
        gated = pspnet(gated=True, gate_kwargs={"group_size": group_size}, **kwargs)
    else:
        dense = cifar_resnet(20, gated=False)
        gated = cifar_resnet(20, gated=True, gate_kwargs={"group_size": group_size})
    # Same convolution / BN weights (gated model's extra gate weights aside).
    for layer in dense.layers:
        if layer.weights:
            gated.get_layer(layer.name).set_weights(layer.get_weights())
    return dense, gated


def trained_recipe(model_path):
    """The `Recipe` of the train.py run that wrote `model_path` (its config.json)."""
    import json

    from bs_keras.recipes import Recipe

    config_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    if not os.path.exists(config_path):
        raise SystemExit(f"{config_path} not found: --model-path must be a model in a train.py run directory")
    with open(config_path) as f:
        return Recipe.from_dict(json.load(f)["recipe"])


def first_output(model):
    """`model` with only its first output, as a tensor (a PSPNet without its auxiliary head)."""
    import keras

    if len(model.outputs) == 1:
        return model
    return keras.Model(model.input, model.outputs[0], name=model.name)


def fractions(gated, dense_macs):
    """(off, on) per gate so that the mean conditional MAC ratio is ~TARGET."""
    from bs_keras.macs import gate_table

    controlled = sum(i.channels * i.macs_per_channel for i in gate_table(gated)) / dense_macs
    open_frac = 1.0 - (1.0 - TARGET) / controlled
    on = max(0.0, open_frac - COND_FRACTION / 2)
    return 1.0 - on - COND_FRACTION, on


def narrow_widths(gated, dense_macs, target, multiple_of=8):
    """Per gate the kept width (a multiple of `multiple_of`, at least one step):
    one fraction f of every gated width, chosen so that the MAC ratio of the
    statically narrowed model is closest to `target`. Returns (widths, ratio)."""
    from bs_keras.macs import gate_table

    table = gate_table(gated)

    def widths_at(f):
        out = []
        for info in table:
            step = multiple_of * info.gate.group_size // np.gcd(multiple_of, info.gate.group_size)
            w = int(round(f * info.channels / step)) * step
            out.append(int(min(info.channels, max(step, w))))
        return out

    def ratio(ws):
        saved = sum((i.channels - w) * i.macs_per_channel for i, w in zip(table, ws))
        return 1.0 - saved / dense_macs

    best = min((abs(ratio(widths_at(f)) - target), f) for f in np.linspace(0.01, 1.0, 991))
    ws = widths_at(best[1])
    return ws, ratio(ws)


def narrow_gated(kind, widths, model_path=None):
    """A fresh gated copy whose gates are set to "first `w` channels always on, the
    rest always off" (zero gate kernels: the gate MLPs still run)."""
    from bs_keras.gates import find_gates

    _, gated = build(kind, model_path=model_path)
    for gate, w in zip(find_gates(gated), widths):
        kernel, bias = gate.logits_dense.get_weights()
        on = np.arange(len(bias)) < w // gate.group_size
        gate.logits_dense.set_weights([np.zeros_like(kernel), np.where(on, 10.0, -10.0).astype(bias.dtype)])
    return gated


def build_narrow(gated, calib):
    """The statically narrowed dense model: a `narrow_gated` model compacted (the
    gates, having no conditional channel, disappear; `gated` is not modified)."""
    from bs_keras.gates import find_gates
    from bs_keras.deploy.compact import compact_model

    narrow = compact_model(gated, calib[:2], batch_size=2)
    if find_gates(narrow):
        raise AssertionError("the narrow reference still has gates")
    return narrow


def time_rounds(fns, inputs, rounds, warmup=2, base="dense", also_vs=None):
    """Calls interleaved one by one: every round, each input is run by every
    variant in turn (the order rotating with the input), so a slow spell of the
    machine hits all variants alike. Returns `(ms, ratio)`: per variant the
    median time per call (ms) and the median over calls of its time / the
    `base` variant's time on the same input in the same round (paired: far
    less noisy than a ratio of two medians on these shared machines). With
    `also_vs`, a third result: the same paired ratios vs that variant."""
    for fn in fns.values():
        for _ in range(warmup):
            for x in inputs:
                fn(x)
    names = list(fns)
    times = {k: [] for k in names}
    for _ in range(rounds):
        for i, x in enumerate(inputs):
            j = i % len(names)
            for k in names[j:] + names[:j]:
                t = time.perf_counter()
                fns[k](x)
                times[k].append((time.perf_counter() - t) * 1000)
    ms = {k: statistics.median(v) for k, v in times.items()}

    def paired(base):
        if base not in times:
            return {}
        return {k: statistics.median(a / b for a, b in zip(v, times[base])) for k, v in times.items()}

    if also_vs is not None:
        return ms, paired(base), paired(also_vs)
    return ms, paired(base)


def litert_fn(flatbuffer):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=bytes(flatbuffer), num_threads=2)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]

    def run(x):
        interp.set_tensor(inp, x)
        interp.invoke()
        return interp.get_tensor(out)

    return run


def bench_model(kind, args, log):
    import tensorflow as tf

    from bs_keras.gates import find_gates
    from bs_keras.macs import conditional_macs, count_macs, gate_table
    from bs_keras.deploy.compact import compact_model
    from bs_keras.deploy.conditional import FoldedModel, conditional_model
    from gate_pattern import set_gate_pattern

    t0 = time.time()
    dense, gated = build(kind, model_path=args.model_path)
    shape = tuple(dense.input_shape[1:])
    dense_macs = count_macs(dense)
    if kind == "trained":
        from bs_keras.deploy.calibration import load_calibration
        from bs_keras.training.tasks import make_task

        recipe = trained_recipe(args.model_path)
        # As the export gets them: training images (crops for segmentation), and evaluation images.
        calib = load_calibration(recipe.dataset, shape, args.calibration * 16)
        source = make_task(recipe.replace(limit_eval=None)).source
        test = np.concatenate([x for x, _ in source.eval(args.images).take(1)]).astype("float32")
        if test.shape[1:] != shape:
            raise SystemExit(f"evaluation images {test.shape[1:]} differ from the model input {shape}")
        off = on = float("nan")
    else:
        rng = np.random.default_rng(1)
        calib = rng.normal(size=(args.calibration,) + shape).astype("float32")
        test = rng.normal(size=(args.images,) + shape).astype("float32")
        off, on = fractions(gated, dense_macs)
        set_gate_pattern(gated, calib, off=off, on=on, nested=args.pattern == "nested", seed=0)
    cmacs = conditional_macs(gated, test, batch_size=8) / dense_macs
    want = args.variants
    # Rows that --xla also times: how to build them, `jit=True` compiled by XLA.
    xla_make = {"dense": lambda jit=False: FoldedModel(dense, mode="masked", jit_compile=jit)}
    variants, mac_ratio = {"dense": xla_make["dense"]()}, {"dense": 1.0}
    if "masked" in want:
        variants["masked"] = FoldedModel(gated, mode="masked")
        mac_ratio["masked"] = count_macs(gated) / dense_macs
    if "compact" in want:
        compact = compact_model(gated, calib, round_to=8, batch_size=8)
        variants["compact"] = FoldedModel(compact, mode="masked")
        mac_ratio["compact"] = count_macs(compact) / dense_macs
    for k, widths in COND_WIDTHS.items():
        if k in want:
            xla_make[k] = lambda jit=False, w=widths: conditional_model(gated, calib, widths=w, batch_size=8,
                                                                        jit_compile=jit)
            variants[k] = xla_make[k]()
            mac_ratio[k] = variants[k].executed_macs(test, batch_size=8).mean() / dense_macs
    if args.tf_cond:
        variants["cond8if"] = conditional_model(
            gated, calib, widths=[i / 8 for i in range(1, 9)], batch_size=8, branching="cond")
        mac_ratio["cond8if"] = variants["cond8if"].executed_macs(test, batch_size=8).mean() / dense_macs
    if "narrow" in want:
        widths, expected = narrow_widths(gated, dense_macs, cmacs.mean())
        fixed = narrow_gated(kind, widths, args.model_path)
        narrow = build_narrow(fixed, calib)
        xla_make["narrow"] = lambda jit=False: FoldedModel(narrow, mode="masked", jit_compile=jit)
        variants["narrow"] = xla_make["narrow"]()
        mac_ratio["narrow"] = count_macs(narrow) / dense_macs
        assert abs(mac_ratio["narrow"] - expected) < 1e-6, (mac_ratio["narrow"], expected)
        log(f"  [{kind}] narrow: gated widths {[i.channels for i in gate_table(gated)][:4]}... -> "
            f"{widths[:4]}... (MAC ratio {mac_ratio['narrow']:.3f} for target {cmacs.mean():.3f})")
        if "narrow+g" in want:
            # The conditional module of the narrow-gated copy: every gate computed, every
            # block a 2-way branch, but always the narrow width.
            xla_make["narrow+g"] = lambda jit=False: conditional_model(fixed, calib[:4], widths="auto",
                                                                       batch_size=4, jit_compile=jit)
            variants["narrow+g"] = xla_make["narrow+g"]()
            mac_ratio["narrow+g"] = variants["narrow+g"].executed_macs(test, batch_size=8).mean() / dense_macs
            # Same convolutions; the gate MLPs add a few MACs.
            assert 0 <= mac_ratio["narrow+g"] - mac_ratio["narrow"] < 0.01, mac_ratio
    # Gate groups (g channels per gate): the same pattern fractions on a gated model
    # whose gates each switch g consecutive channels; rows "masked/g8", "cond/g8".
    gated_of, group_cmacs = {k: gated for k in variants}, {}
    if kind == "trained" and args.group_sizes:
        log(f"  [{kind}] --group-sizes: skipped (the trained model's gates are fixed)")
    for g in args.group_sizes if kind != "trained" else ():
        _, gated_g = build(kind, group_size=g)
        off_g, on_g = fractions(gated_g, dense_macs)
        set_gate_pattern(gated_g, calib, off=off_g, on=on_g, nested=args.pattern == "nested", seed=0)
        group_cmacs[g] = conditional_macs(gated_g, test, batch_size=8).mean() / dense_macs
        for k in ("masked", "cond"):
            if k not in want:
                continue
            name = f"{k}/g{g}"
            if k == "masked":
                variants[name] = FoldedModel(gated_g, mode="masked")
                mac_ratio[name] = count_macs(gated_g) / dense_macs
            else:
                xla_make[name] = lambda jit=False, m=gated_g: conditional_model(m, calib, widths="auto",
                                                                                batch_size=8, jit_compile=jit)
                variants[name] = xla_make[name]()
                mac_ratio[name] = variants[name].executed_macs(test, batch_size=8).mean() / dense_macs
            gated_of[name] = gated_g
        log(f"  [{kind}] group size {g}: {find_gates(gated_g)[0].num_gates} gates in the first block, "
            f"mean conditional MAC ratio {group_cmacs[g]:.3f}")
    # Exactness check on the test images (batch 1).
    for k in [k for k in variants if k.split("/")[0] in ("masked", *COND_WIDTHS)]:
        ref = gated_of[k](test[:4], training=False).numpy()
        got = np.concatenate([variants[k](test[i : i + 1]).numpy() for i in range(len(ref))])
        err = float(np.abs(got - ref).max())
        log(f"  [{kind}] {k}: max |diff| vs Keras gated model = {err:.2e}")
    pattern = ("gates as trained" if kind == "trained" else
               f"pattern per gate: off {off:.2f} on {on:.2f} conditional {COND_FRACTION:.2f} ({args.pattern})")
    log(f"  [{kind}] {pattern}; setup {time.time() - t0:.0f}s")

    ones = [tf.constant(test[i : i + 1]) for i in range(len(test))]
    tf_fns = {k: v.__call__ for k, v in variants.items()}
    for k, fn in tf_fns.items():
        fn(ones[0])
    results, ratios = {}, {}  # per column: ms per variant, paired latency ratio vs dense
    results["tf b1"], ratios["tf b1"] = time_rounds(tf_fns, ones, args.rounds)
    if args.xla:
        t1 = time.time()
        xla_modules = {k: make(jit=True) for k, make in xla_make.items() if k.split("/")[0] in XLA_VARIANTS}
        for k, module in xla_modules.items():
            t2 = time.time()
            module(ones[0])
            diff = max(float(np.abs(module(x).numpy() - variants[k](x).numpy()).max()) for x in ones[:4])
            log(f"  [{kind}] {k} tf-xla: compiled in {time.time() - t2:.0f}s, max |diff| vs its TF function "
                f"= {diff:.2e}")
        xla_fns = {k: m.__call__ for k, m in xla_modules.items()}
        # Plain TF's dense in the same rounds: the XLA rows against the other baseline too.
        xla_fns["dense (TF)"] = tf_fns["dense"]
        results["tf-xla b1"], ratios["tf-xla b1"], vs_tf = time_rounds(xla_fns, ones, args.rounds,
                                                                       also_vs="dense (TF)")
        del results["tf-xla b1"]["dense (TF)"], ratios["tf-xla b1"]["dense (TF)"]
        ratios["tf-xla vs TF dense"] = vs_tf
        log(f"  [{kind}] tf-xla: dense under XLA / dense in TF (same rounds) = {vs_tf['dense']:.3f}; "
            "vs TF dense: " + ", ".join(f"{k} {v:.3f}" for k, v in vs_tf.items() if k != "dense (TF)"))
        log(f"  [{kind}] XLA compilation + timing {time.time() - t1:.0f}s")

    if not args.no_litert:
        t1 = time.time()
        for quant, label in (("none", "lite fp32"), ("dynamic_range", "lite dyn")):
            if args.quick and quant == "dynamic_range":
                continue
            fns = {}
            for k, v in variants.items():
                if k == "cond8if":
                    continue  # LiteRT always uses nested cond: same as cond8
                try:
                    fns[k] = litert_fn(v.to_tflite(quant))
                except Exception as e:  # report and go on
                    log(f"  [{kind}] {k} {label}: conversion failed: {type(e).__name__}: {str(e)[:200]}")
            for k in ("dense", "masked", "cond", "narrow"):
                if k in fns:
                    diff = np.abs(fns[k](test[:1]) - variants[k](ones[0]).numpy()).max()
                    log(f"  [{kind}] {k} {label}: max |diff| vs its TF function = {float(diff):.2e}")
            np_inputs = [x.numpy() for x in ones]
            results[label], ratios[label] = time_rounds(fns, np_inputs, args.rounds)
        log(f"  [{kind}] LiteRT conversions + timing {time.time() - t1:.0f}s")

    if not args.quick:
        batch = tf.constant(np.concatenate([test] * (32 // len(test) + 1))[:32])
        rounds32 = 3 if kind == "r50" else 10
        if kind == "psp":  # batch 32 of 512x512 PSPNets: minutes a call
            return cmacs.mean(), mac_ratio, results, ratios, group_cmacs
        results["tf b32"], ratios["tf b32"] = time_rounds(tf_fns, [batch], rounds32, warmup=1)
        widths32 = {k: variants[k].call_with_widths(batch)[1].numpy() for k in ("cond4", "cond8", "cond") if k in variants}
        for k, w in widths32.items():
            frac = np.mean(w / np.array(variants[k].gate_channels))
            log(f"  [{kind}] {k} batch 32: mean executed width fraction {frac:.2f} (widest any sample needs)")
    return cmacs.mean(), mac_ratio, results, ratios, group_cmacs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds, no dyn-range, no batch 32")
    parser.add_argument("--models", default="r50,r20")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--images", type=int, default=None, help="test images cycled per round")
    parser.add_argument("--calibration", type=int, default=None)
    parser.add_argument("--pattern", choices=("nested", "independent"), default="nested")
    parser.add_argument("--no-litert", action="store_true")
    parser.add_argument("--xla", action="store_true",
                        help="also time dense, narrow, narrow+g, cond and cond/gG under XLA (jit_compile)")
    parser.add_argument("--tf-cond", action="store_true", help="also time cond8 with nested tf.cond in TF")
    parser.add_argument(
        "--group-sizes", default="",
        help="comma-separated gate group sizes g > 1: also time masked and cond (fitted widths) on a "
             "gated model whose gates switch g channels each (rows masked/gG, cond/gG)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default=None,
        help=f"comma-separated subset of {','.join(VARIANTS)} (dense is always timed; default all "
             "but cond8ch, --quick: also without narrow)",
    )  # fmt: skip
    parser.add_argument("--psp-size", type=int, default=512, help="--models psp: input height and width")
    parser.add_argument("--psp-width", type=float, default=1.0, help="--models psp: width multiplier")
    parser.add_argument("--model-path", help="a gated .keras model trained by train.py (for --models trained)")
    args = parser.parse_args()
    if "trained" in args.models.split(",") and not args.model_path:
        parser.error("--models trained needs --model-path")
    if args.variants is None:
        args.variants = [v for v in VARIANTS if v != "cond8ch" and not (args.quick and v.startswith("narrow"))]
    else:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(args.variants) - set(VARIANTS))
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    try:
        args.group_sizes = [int(g) for g in args.group_sizes.split(",") if g.strip()]
    except ValueError:
        parser.error(f"--group-sizes: comma-separated integers, e.g. 4,8. Received: {args.group_sizes!r}")
    if any(g < 2 for g in args.group_sizes):
        parser.error("--group-sizes: sizes must be >= 2 (g = 1 is the main model)")
    global PSP_SIZE, PSP_WIDTH
    PSP_SIZE, PSP_WIDTH = args.psp_size, args.psp_width
    args.rounds = args.rounds or (5 if args.quick else 11)
    args.images = args.images or (8 if args.quick else 16)
    args.calibration = args.calibration or (16 if args.quick else 32)

    def log(text):
        print(text, flush=True)

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    log(f"TF {tf.__version__}, threads: intra {tf.config.threading.get_intra_op_parallelism_threads()} "
        f"(0=all), {os.cpu_count()} CPUs; TF = BN-folded tf.function (FoldedModel) for every variant")
    t0 = time.time()
    for kind in args.models.split(","):
        cratio, mac_ratio, results, ratios, group_cmacs = bench_model(kind, args, log)
        name = {"r50": "ResNet-50 224x224", "r20": "CIFAR ResNet-20 32x32",
                "psp": f"PSPNet-50 {PSP_SIZE}x{PSP_SIZE} width {PSP_WIDTH:g}",
                "trained": f"trained model {args.model_path}"}[kind]
        log(f"\n{name}: mean conditional MAC ratio {cratio:.3f}")
        cols = list(results)
        head = f"{'variant':10s} {'exec MACs':>9s} " + " ".join(f"{c + ' ms':>13s} {'ratio':>6s}" for c in cols)
        log(head)
        for k in mac_ratio:
            row = f"{k:10s} {mac_ratio[k]:9.3f} "
            for c in cols:
                ms, r = results[c].get(k), ratios[c].get(k)
                row += f"{ms:13.2f} {r:6.3f} " if ms is not None and r is not None else f"{'n/a':>13s} {'':6s} "
            log(row)
        log("targets: compact lite-fp32 ratio <= 1.15 x its exec MACs; best TF b1 ratio <= 1.25 x cond MAC ratio")
        if "lite fp32" in results and "compact" in results["lite fp32"]:
            r = ratios["lite fp32"]["compact"]
            log(f"  compact lite fp32: {r:.3f} vs {1.15 * mac_ratio['compact']:.3f} -> "
                f"{'MET' if r <= 1.15 * mac_ratio['compact'] else 'NOT MET'}")
        for col in (c for c in ("tf b1", "tf-xla b1") if c in results):
            gated_rows = [(v, k) for k, v in ratios[col].items()
                          if k not in ("dense", "narrow", "narrow+g") and "/g" not in k]  # fmt: skip
            if gated_rows:
                best = min(gated_rows)
                vs_tf = ""
                if col == "tf-xla b1":  # the faster dense baseline gives the larger ratio
                    r_tf = ratios["tf-xla vs TF dense"][best[1]]
                    r_fast = max(best[0], r_tf)
                    vs_tf = (f" (vs dense in plain TF {r_tf:.3f}; vs the faster dense {r_fast:.3f} -> "
                             f"{'MET' if r_fast <= 1.25 * cratio else 'NOT MET'})")
                log(f"  best {col}: {best[1]} {best[0]:.3f} vs {1.25 * cratio:.3f} -> "
                    f"{'MET' if best[0] <= 1.25 * cratio else 'NOT MET'}{vs_tf}")
            for g, gc in group_cmacs.items():
                if f"cond/g{g}" in ratios[col]:
                    r = ratios[col][f"cond/g{g}"]
                    g1 = ratios[col].get("cond")
                    g1 = f"; g=1 cond: {g1 / cratio:.2f}" if g1 else ""
                    log(f"  cond/g{g} {col}: {r:.3f} vs 1.25 x its conditional MAC ratio {gc:.3f} = "
                        f"{1.25 * gc:.3f} (latency / conditional MACs {r / gc:.2f}{g1})")
        if "narrow" in results["tf b1"]:
            line = ", ".join(f"{c} {ratios[c]['narrow']:.3f}" for c in cols if "narrow" in ratios[c])
            log(f"  narrow (static, MAC ratio {mac_ratio['narrow']:.3f} ~ conditional {cratio:.3f}): latency ratio {line}")
        if "narrow+g" in results["tf b1"] and "cond" in results["tf b1"]:
            for c in (c for c in cols if {"narrow", "narrow+g", "cond"} <= set(results[c])):
                n, ng, cd = (ratios[c][k] for k in ("narrow", "narrow+g", "cond"))
                log(f"  {c}: gating overhead (narrow+g - narrow) {ng - n:+.3f}, per-sample widths "
                    f"(cond - narrow+g) {cd - ng:+.3f}")
        log("")
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
