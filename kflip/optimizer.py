"""FlipLSTM: a Keras optimizer whose decision per binary weight is flip / no flip."""

from __future__ import annotations

import warnings

from kflip import _keras

_keras.select_keras2()
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402

from kflip import _checks as checks  # noqa: E402
from kflip import cell as cell_lib  # noqa: E402
from kflip import conditioning  # noqa: E402
from kflip import rule as rule_lib  # noqa: E402
from kflip.binary import is_binary_variable, named_binary_variables, unique_names  # noqa: E402

Optimizer = tf.keras.optimizers.legacy.Optimizer
_OUTPUTS = ("flip", "gradient")
_COUNTER_BASE = 2**20
# Slots whose shape is not the variable's (checkpoint restore must be told).
_SLOT_SHAPES = {"v": [], "flips": [2], "tensor": [2]}


def _float_optimizer(identifier):
    if identifier is None:
        return tf.keras.optimizers.legacy.Adam(learning_rate=0.01)
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, (str, dict)):
        try:
            opt = tf.keras.optimizers.get(identifier, use_legacy_optimizer=True)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"`float_optimizer`: cannot build an optimizer from {identifier!r} ({e!r})."
            ) from e
        if isinstance(opt, Optimizer):
            return opt
    raise ValueError(
        "`float_optimizer` must be a tf.keras legacy optimizer (e.g. "
        "`tf.keras.optimizers.legacy.Adam(0.01)`), its name or its config dict; got "
        f"{identifier!r}."
    )


def _hyper(name, value, **bounds):
    """A number checked against ``bounds``, or a ``LearningRateSchedule`` as it is."""
    if isinstance(value, tf.keras.optimizers.schedules.LearningRateSchedule) or callable(
        value
    ):
        return value
    return checks.number(name, value, **bounds)


def _check_binary_pair(grad, var):
    if isinstance(grad, tf.IndexedSlices):
        raise ValueError(
            f"FlipLSTM got a sparse gradient (IndexedSlices) for binary variable "
            f"{var.name}; binary weights need dense gradients."
        )
    dtype = tf.as_dtype(getattr(var, "true_dtype", var.dtype))
    if not dtype.is_floating:
        raise ValueError(
            f"FlipLSTM: binary variable {var.name} has dtype {dtype.name}; it must be a "
            "floating-point variable holding +1/-1."
        )
    if not tf.as_dtype(grad.dtype).is_floating:
        raise ValueError(
            f"FlipLSTM: the gradient for {var.name} has dtype {tf.as_dtype(grad.dtype).name}, "
            "expected a floating-point gradient."
        )
    if not grad.shape.is_compatible_with(var.shape):
        raise ValueError(
            f"FlipLSTM: the gradient for {var.name} has shape {grad.shape}, but the "
            f"variable has shape {var.shape}."
        )


@tf.keras.utils.register_keras_serializable(package="kflip")
class FlipLSTM(Optimizer):
    """Flip binary weights by the sign of a learned coordinatewise LSTM's output.

    For every binary variable (larq ``precision == 1``) the float gradient is turned
    into features (see :mod:`kflip.cell`), fed to a tiny LSTM whose weights are shared
    by every coordinate and whose state ``(h, c)`` is kept per weight, and the output
    ``g_t`` decides ``theta <- theta * sign(g_t)``. Binary weights are snapped to
    exactly +1/-1 on the first step and stay so. Every other variable goes to
    ``float_optimizer``.

    Like Bop (Helwegen et al., 2019) there are no latent weights: the optimizer state
    is the LSTM's ``(h, c)`` per weight, and ``kflip.bop_weights()`` makes the LSTM
    reproduce Bop exactly. The shipped default weights are meta-learned instead
    ("learning to learn", Andrychowicz et al., 2016; see ``kflip meta-train``).

    Example:
      >>> import kflip
      >>> import tensorflow as tf
      >>> tf.keras.backend.clear_session()  # deterministic layer names
      >>> ds = kflip.data.digits()
      >>> model = kflip.models.mlp(input_shape=(8, 8, 1), hidden=(16,))
      >>> opt = kflip.FlipLSTM()
      >>> model.compile(opt, "sparse_categorical_crossentropy", jit_compile=True)
      >>> _ = model.fit(ds.x_train[:128], ds.y_train[:128], batch_size=64, verbose=0)
      >>> kflip.assert_binary(model)  # kernels are still exactly +-1
      >>> sorted(set(model.layers[1].kernel.numpy().ravel()))
      [-1.0, 1.0]
      >>> sorted(opt.flip_counts(model))  # cumulative flips per binary kernel
      ['quant_dense/kernel', 'quant_dense_1/kernel']
      >>> opt.binary_sizes(model)
      {'quant_dense/kernel': 1024, 'quant_dense_1/kernel': 160}

    Args:
      weights: LSTM weights: None or ``"default"`` (the weights shipped in the
        package), a path to an ``.npz`` written by ``kflip meta-train``, an
        :class:`kflip.cell.LSTMWeights` or its config dict.
      float_optimizer: optimizer for non-binary variables (BatchNorm, biases, float
        layers). Default ``tf.keras.optimizers.legacy.Adam(0.01)``.
      output: ``"flip"`` (the invention) or ``"gradient"`` (ablation: the LSTM output
        updates latent float weights, ``w <- clip(w + learning_rate * sign(w) * g_t)``;
        needs a sign quantizer such as ``"ste_sign"`` on the layer).
      flip_threshold: flip only where ``g_t < -flip_threshold`` (float or a
        ``LearningRateSchedule`` of the step). Default 0.
      max_flip_rate: at most this fraction of each binary variable flips per step
        (the most negative ``g_t`` win). None for no limit.
      hidden_size: LSTM hidden size; must be >= that of ``weights`` (extra units are
        zero-padded and inert until meta-trained). Default: that of ``weights``.
      learning_rate: RMS step size of ``output="gradient"`` on the latent weights
        (default 1e-2: 96.65% vs 95.51% for 1e-3 on the MNIST MLP); unused for flips.
      latent_clip: ``output="gradient"`` clips latent weights to this magnitude.

    References:
      - [Helwegen et al., 2019. Latent Weights Do Not Exist: Rethinking Binarized
        Neural Network Optimization](https://arxiv.org/abs/1906.02107)
      - [Andrychowicz et al., 2016. Learning to learn by gradient descent by gradient
        descent](https://arxiv.org/abs/1606.04474)
    """

    _HAS_AGGREGATE_GRAD = True

    def __init__(
        self,
        weights=None,
        float_optimizer=None,
        *,
        output: str = "flip",
        flip_threshold=0.0,
        max_flip_rate: float | None = None,
        hidden_size: int | None = None,
        learning_rate=1e-2,
        latent_clip: float | None = 1.0,
        name: str = "FlipLSTM",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if output not in _OUTPUTS:
            raise ValueError(f"`output` must be one of {_OUTPUTS}, got {output!r}.")
        flip_threshold = _hyper("flip_threshold", flip_threshold, low=0.0)
        learning_rate = _hyper("learning_rate", learning_rate, low=0.0, low_open=True)
        if max_flip_rate is not None:
            max_flip_rate = checks.number(
                "max_flip_rate", max_flip_rate, low=0.0, high=1.0, low_open=True
            )
        if latent_clip is not None:
            latent_clip = checks.number("latent_clip", latent_clip, low=0.0, low_open=True)
        lstm = cell_lib.load_weights(weights)
        if hidden_size is not None:
            lstm = lstm.padded(checks.positive_int("hidden_size", hidden_size))
        self.lstm_weights = lstm
        self.output = output
        self.max_flip_rate = max_flip_rate
        self.latent_clip = latent_clip
        self._set_hyper("flip_threshold", flip_threshold)
        self._set_hyper("learning_rate", learning_rate)
        self._float_optimizer = _float_optimizer(float_optimizer)
        self._track_trackable(self._float_optimizer, name="float_optimizer")
        self._binary_vars: list = []
        self._warned_no_binary = False

    # ---- public helpers ----------------------------------------------------------
    @property
    def float_optimizer(self) -> Optimizer:
        return self._float_optimizer

    @property
    def hidden_size(self) -> int:
        return self.lstm_weights.hidden_size

    @property
    def state_bytes_per_weight(self) -> int:
        """Optimizer-state bytes per binary weight (the LSTM ``h`` and ``c``)."""
        return cell_lib.state_bytes_per_weight(self.hidden_size)

    def _cell_slot_names(self):
        hidden = range(self.hidden_size)
        return [f"h{k}" for k in hidden] + [f"c{k}" for k in hidden]

    def lstm_state(self, var):
        """``(h, c)`` of binary variable ``var``, each of shape ``var.shape + [H]``."""
        state = self._state(var)
        return state.h, state.c

    def _named(self, model):
        if model is None:
            names = unique_names(v.name.split(":")[0] for v in self._binary_vars)
            pairs = zip(names, self._binary_vars)
        else:
            pairs = named_binary_variables(model)
        return [(n, v) for n, v in pairs if self._has_state(v)]

    def _has_state(self, var) -> bool:
        try:
            self.get_slot(var, "flips")
        except KeyError:
            return False
        return True

    def flip_counts(self, model=None) -> dict:
        """Cumulative flips per binary variable since training started.

        Keys are ``"<layer>/<weight>"`` names when ``model`` is given (right after
        ``load_model`` too, where every kernel is called ``kernel:0``), else the
        variables' own names.
        """
        return {n: int(self._state(v).flips) for n, v in self._named(model)}

    def binary_sizes(self, model=None) -> dict:
        """Number of weights per binary variable, keyed like :meth:`flip_counts`."""
        return {n: int(v.shape.num_elements()) for n, v in self._named(model)}

    # ---- weights / slots ----------------------------------------------------------
    @property
    def weights(self):
        return self._weights + self._float_optimizer.weights

    def variables(self):
        return self.weights

    def _split(self, grads_and_vars):
        binary, floats = [], []
        for g, v in grads_and_vars:
            if is_binary_variable(v) and g is not None:
                _check_binary_pair(g, v)
            (binary if is_binary_variable(v) else floats).append((g, v))
        return binary, floats

    def _create_all_weights(self, var_list):
        binary = [v for v in var_list if is_binary_variable(v)]
        floats = [v for v in var_list if not is_binary_variable(v)]
        if floats:
            self._float_optimizer._create_all_weights(floats)
        return super()._create_all_weights(binary)

    def _create_slots(self, var_list):
        for var in var_list:
            if self.output == "gradient" and isinstance(
                getattr(var, "quantizer", None), lq.quantizers.NoOp
            ):
                raise ValueError(
                    f"FlipLSTM(output='gradient') updates latent weights, but {var.name} "
                    "has a NoOp quantizer, so the forward pass would see the latent "
                    "floats. Use a sign quantizer such as 'ste_sign' for this mode."
                )
            # One slot per hidden unit, each of the variable's shape: contiguous for
            # XLA, and restorable by every Keras save path (they assume var shape).
            for name in self._cell_slot_names():
                self.add_slot(var, name)
            self.add_slot(var, "v", shape=_SLOT_SHAPES["v"])
            # Cumulative flips as [low, high] words of the variable's dtype (low <
            # 2**20 carries into high): exact far beyond float32's 2**24, and a plain
            # slot, so every Keras/TF save path restores it.
            self.add_slot(var, "flips", shape=_SLOT_SHAPES["flips"])
            if self.lstm_weights.conditioned:  # per-tensor conditioning: (v_slow, rate)
                self.add_slot(var, "tensor", shape=_SLOT_SHAPES["tensor"])
            if not any(var is known for known in self._binary_vars):  # called per trace
                self._binary_vars.append(var)

    def _create_or_restore_slot_variable(
        self, slot_variable_position, slot_name, variable, slot_variable_shape=None
    ):
        # Some Keras load paths (SavedModel) assume every slot has the variable's
        # shape; ours for the per-tensor moment and the flip counter do not.
        if slot_name in _SLOT_SHAPES:
            slot_variable_shape = tf.TensorShape(_SLOT_SHAPES[slot_name])
        return super()._create_or_restore_slot_variable(
            slot_variable_position, slot_name, variable, slot_variable_shape
        )

    def _create_eagerly(self, binary, floats):
        """Create every variable of this optimizer and of its float optimizer now (for
        the ``(grad, var)`` pairs of :meth:`_split`), outside any traced function and
        without tf.function's variable lifting.

        Keras creates optimizer variables inside the first trace of the train step
        (under ``init_scope``, so they are ordinary eager variables), and tf.function
        then traces the whole step a second time because variables were created. These
        need no lifting: creating them unlifted spares that second trace whenever
        nothing else in the step creates variables (compiled metrics still do).
        """
        def unlifted(next_creator, **kwargs):
            kwargs["experimental_enable_variable_lifting"] = False
            return next_creator(**kwargs)

        for opt, pairs in ((self._float_optimizer, floats), (self, binary)):
            variables = [v for g, v in pairs if g is not None]
            if opt is self or variables:  # names as Keras gives them: "<optimizer>/..."
                with tf.name_scope(opt._name), tf.init_scope():
                    with tf.variable_creator_scope(unlifted):
                        opt._create_all_weights(variables)

    # ---- the update ---------------------------------------------------------------
    def apply_gradients(
        self, grads_and_vars, name=None, experimental_aggregate_gradients=True
    ):
        binary, floats = self._split(list(grads_and_vars))
        self._create_eagerly(binary, floats)
        ops = []
        if floats:
            ops.append(
                self._float_optimizer.apply_gradients(
                    floats,
                    experimental_aggregate_gradients=experimental_aggregate_gradients,
                )
            )
        if binary:
            ops.append(
                super().apply_gradients(
                    binary,
                    name=name,
                    experimental_aggregate_gradients=experimental_aggregate_gradients,
                )
            )
        else:
            if not self._warned_no_binary:
                self._warned_no_binary = True
                warnings.warn(
                    "FlipLSTM found no binary variables (larq `precision == 1`, e.g. "
                    "QuantDense(kernel_quantizer='ste_sign')); every variable goes to "
                    "the float optimizer, so this trains like "
                    f"{type(self._float_optimizer).__name__}.",
                    stacklevel=2,
                )
            with tf.init_scope():
                _ = self.iterations
            ops.append(self.iterations.assign_add(1))
        return tf.group(*ops)

    # ---- Keras slots <-> FlipState ------------------------------------------------
    def _state_slots(self) -> list:
        extra = ["tensor"] if self.lstm_weights.conditioned else []
        return self._cell_slot_names() + ["v", "flips"] + extra

    def _slot_values(self, var) -> list:
        return [tf.convert_to_tensor(self.get_slot(var, n)) for n in self._state_slots()]

    def _to_state(self, values, step) -> rule_lib.FlipState:
        """The rule's state from the slot values (in :meth:`_state_slots` order)."""
        hidden = self.hidden_size
        h, c = values[:hidden], values[hidden : 2 * hidden]
        v, counter, *tensor = values[2 * hidden :]
        low, high = tf.unstack(tf.cast(counter, tf.int64))
        return rule_lib.FlipState(
            h=tf.stack(h, axis=-1),
            c=tf.stack(c, axis=-1),
            v=v,
            step=tf.cast(step, tf.int64),
            flips=high * _COUNTER_BASE + low,
            tensor=conditioning.TensorState(*tf.unstack(tensor[0])) if tensor else (),
        )

    @staticmethod
    def _to_values(state: rule_lib.FlipState, counter_dtype) -> list:
        """The slot values of ``state`` (``step`` is Keras' ``iterations``)."""
        base = _COUNTER_BASE
        words = tf.cast(tf.stack([state.flips % base, state.flips // base]), counter_dtype)
        tensor = [tf.stack(list(state.tensor))] if state.tensor else []
        cells = tf.unstack(state.h, axis=-1) + tf.unstack(state.c, axis=-1)
        return cells + [state.v, words] + tensor

    def _state(self, var) -> rule_lib.FlipState:
        """The rule's state of ``var``, read from its slots."""
        return self._to_state(self._slot_values(var), self.iterations)

    def _rule(self, flip_threshold) -> rule_lib.FlipRule:
        return rule_lib.FlipRule.from_weights(
            self.lstm_weights, flip_threshold=flip_threshold, max_flip_rate=self.max_flip_rate
        )

    def _step(self, grad, var, values, step, hyper):
        """New ``(var, slot values)``: the whole update of one binary variable, on tensors."""
        state = self._to_state(values, step)
        if self.output == "flip":
            theta = cell_lib.sign_pm1(var)
            signs, state = self._rule(hyper[0]).update(grad, state, theta)
            new_var = theta * signs
        else:
            new_var, state = self._rule(hyper[0]).latent_update(
                grad, state, var, hyper[1], self.latent_clip
            )
        return new_var, self._to_values(state, values[2 * self.hidden_size + 1].dtype)

    def _traced_step(self, grad, var, values, step, hyper):
        """:meth:`_step` as a tf.function, made once per optimizer and traced once per
        rank of variable: every per-weight argument (``grad``, ``var`` and the slots of
        its shape) is traced with unknown dimensions, so the MNIST MLP's three kernels
        share one trace and the CNN's five share two. XLA inlines the function and
        compiles each call for its own shapes: the compiled step is the same.

        Where Keras traces the first train step twice (when compiled metrics create
        variables in the first trace), the second trace reuses these graphs. A rule
        that reads static sizes (:attr:`kflip.rule.FlipRule.shape_free` is False) is
        traced once per shape instead.
        """
        if getattr(self, "_step_fn", None) is None:
            self._step_fn = tf.function(self._step, autograph=False)
        args = (grad, var, values, step, hyper)
        if not self._rule(hyper[0]).shape_free:
            return self._step_fn(*args)
        shape = var.shape

        def spec(t):
            relaxed = [None] * t.shape.rank if t.shape == shape else t.shape
            return tf.TensorSpec(relaxed, t.dtype)

        specs = tf.nest.map_structure(spec, (grad, var, values)) + (step, [spec(h) for h in hyper])
        return self._step_fn.get_concrete_function(*specs)(*args)

    def _resource_apply_dense(self, grad, var, apply_state=None):
        dtype = var.dtype.base_dtype
        if grad.dtype != dtype:
            grad = tf.cast(grad, dtype)
        hyper = [self._decayed("flip_threshold", dtype)]
        if self.output == "gradient":
            hyper.append(self._decayed("learning_rate", dtype))
        slots = [self.get_slot(var, n) for n in self._state_slots()]
        new_var, values = self._traced_step(
            grad, tf.convert_to_tensor(var), [tf.convert_to_tensor(v) for v in slots],
            self.iterations, hyper,
        )
        return tf.group(var.assign(new_var), *(v.assign(x) for v, x in zip(slots, values)))

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        raise NotImplementedError(
            "FlipLSTM does not support sparse gradients on binary variables."
        )

    def _decayed(self, name, dtype):
        hyper = self._get_hyper(name, dtype)
        if isinstance(hyper, tf.keras.optimizers.schedules.LearningRateSchedule):
            hyper = tf.cast(hyper(tf.cast(self.iterations, dtype)), dtype)
        return hyper

    # ---- serialisation ------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "weights": self.lstm_weights.get_config(),
                "float_optimizer": tf.keras.optimizers.serialize(self._float_optimizer),
                "output": self.output,
                "flip_threshold": self._serialize_hyperparameter("flip_threshold"),
                "max_flip_rate": self.max_flip_rate,
                "learning_rate": self._serialize_hyperparameter("learning_rate"),
                "latent_clip": self.latent_clip,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for hyper in ("flip_threshold", "learning_rate"):
            if isinstance(config.get(hyper), dict):
                config[hyper] = tf.keras.optimizers.schedules.deserialize(
                    config[hyper], custom_objects=custom_objects
                )
        if isinstance(config.get("float_optimizer"), dict):
            config["float_optimizer"] = tf.keras.optimizers.deserialize(
                config["float_optimizer"],
                custom_objects=custom_objects,
                use_legacy_optimizer=True,
            )
        return cls(**config)
