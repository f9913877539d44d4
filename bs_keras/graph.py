"""The layer graph of a functional Keras model, for analyses and rewrites.

MAC counting, compaction, pruning and conditional execution all read the
same facts from a functional model: its call nodes from inputs to outputs,
who consumes a tensor, and the chain of per-channel layers (BN,
activations, ...) between a gated tensor and the convolution that produced
it. `LayerGraph` answers those from Keras' node bookkeeping.

Example:

```python
graph = LayerGraph(model, purpose="MAC counting")
for node in graph.nodes:
    if isinstance(node.operation, ChannelGate):
        producer, chain = graph.trace_back(node.input_tensors[1], through=PASSTHROUGH)
```
"""

import keras


def functional_model(model, purpose="This analysis"):
    """The functional graph of `model` (a Sequential model's inner one).

    Raises:
        ValueError: `model` is subclassed or an unbuilt Sequential model;
            the message names `purpose`.
    """
    if isinstance(model, keras.Sequential):
        if getattr(model, "_functional", None) is None:
            raise ValueError(f"Build the Sequential model (give it an input shape) before {purpose}.")
        return model._functional
    if not hasattr(model, "_nodes_by_depth"):
        raise ValueError(
            f"{purpose} reads the layer graph and needs a functional or Sequential "
            f"model. Received: {type(model).__name__}. Build the model with "
            "keras.Model(inputs, outputs)."
        )
    return model


def _matches(op, through):
    if isinstance(through, tuple):
        return isinstance(op, through)
    return bool(through(op))


class LayerGraph:
    """Call nodes, producers and consumers of one functional model.

    Args:
        model: a built functional or Sequential Keras model (nested models
            are single nodes; analyse them with their own `LayerGraph`).
        purpose: what the caller does, for error messages.

    Attributes:
        model: the functional model.
        nodes: its non-input call nodes, from inputs to outputs.
    """

    def __init__(self, model, purpose="This analysis"):
        self.model = functional_model(model, purpose)
        by_depth = self.model._nodes_by_depth
        self.nodes = [n for depth in sorted(by_depth, reverse=True) for n in by_depth[depth] if not n.is_input]
        self._consumers = {}
        for node in self.nodes:
            for t in node.input_tensors:
                self._consumers.setdefault(id(t), []).append(node)
        for t in self.model.outputs:
            self._consumers.setdefault(id(t), []).append(None)

    def consumers(self, tensor):
        """The nodes that take `tensor` as an input; `None` for a model output."""
        return list(self._consumers.get(id(tensor), []))

    def only_consumer(self, tensor):
        """The single node consuming `tensor`, or `None` if not exactly one."""
        found = self._consumers.get(id(tensor), [])
        return found[0] if len(found) == 1 else None

    @staticmethod
    def producer(tensor):
        """`(layer, node)` that computed `tensor`; `(None, None)` for a model input."""
        op, node_index, _ = tensor._keras_history
        if isinstance(op, keras.layers.InputLayer):
            return None, None
        return op, op._inbound_nodes[node_index]

    def trace_back(self, tensor, through):
        """Walk from `tensor` to the first producer not matched by `through`.

        Args:
            tensor: a symbolic tensor of the model.
            through: a tuple of layer classes, or a predicate on a layer,
                for the layers to walk through (their first input).

        Returns:
            `(node, chain)`: the producing node (`None` at a model input) and
            the nodes walked through, nearest to `tensor` first.
        """
        chain = []
        while True:
            op, node = self.producer(tensor)
            if op is None:
                return None, chain
            if not _matches(op, through):
                return node, chain
            chain.append(node)
            tensor = node.input_tensors[0]

    def trace_forward(self, tensor, through):
        """The first consumers of `tensor` not matched by `through`.

        Walks forward through the layers matched by `through` (a tuple of
        layer classes, or a predicate on a layer).

        Returns:
            `(ends, chain)`: the consuming nodes reached (`None` for a model
            output), and the nodes walked through, both depth first in
            consumer order.
        """
        ends, chain = [], []

        def visit(t):
            for node in self.consumers(t):
                if node is not None and _matches(node.operation, through):
                    chain.append(node)
                    visit(node.output_tensors[0])
                else:
                    ends.append(node)

        visit(tensor)
        return ends, chain
