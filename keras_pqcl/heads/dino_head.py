"""DINO projection head."""

import keras
from keras import ops

from keras_pqcl.layers.batch_stat_norm import BatchStatNorm
from keras_pqcl.layers.dense import Dense
from keras_pqcl.layers.init import linear_init
from keras_pqcl.layers.weight_norm import WeightNormDense


@keras.saving.register_keras_serializable(package="keras_pqcl")
class DINOHead(keras.layers.Layer):
    """MLP ``D -> hidden -> hidden -> bottleneck`` (GELU), L2 norm, weight-normed last layer.

    Defaults follow DINO: hidden 2048, bottleneck 256, three linear layers, no BatchNorm,
    ``norm_last_layer=True`` (gain frozen at 1).

    ``use_bn=True`` is the reference's ``use_bn_in_head``: linear, BatchNorm, GELU for every
    hidden layer (:class:`~keras_pqcl.layers.BatchStatNorm`, always on the batch's statistics,
    as the reference's train-mode heads). Off by default, as in DINO's ViT recipes. It helps
    small models on data whose images look alike at initialisation, where the teacher's
    outputs barely differ between images and the centering flattens them into uniform
    collapse: the BatchNorm rescales those small differences to unit variance.

    Call args:
        x: ``(..., D)`` features (CLS tokens, or any tokens: iBOT/PQCL apply the same head to
            patches and queries).

    Returns:
        ``(..., out_dim)`` logits (cosines times the gain).
    """

    def __init__(
        self,
        out_dim=65536,
        hidden_dim=2048,
        bottleneck_dim=256,
        num_layers=3,
        norm_last_layer=True,
        use_bn=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.num_layers = num_layers
        self.norm_last_layer = norm_last_layer
        self.use_bn = use_bn
        policy = self.dtype_policy
        widths = [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        self.mlp = [
            Dense(
                width,
                dtype=policy,
                name=f"mlp_{i}",
                **linear_init(),
            )
            for i, width in enumerate(widths)
        ]
        self.norms = [BatchStatNorm(dtype=policy, name=f"bn_{i}") for i in range(num_layers - 1)] if use_bn else []
        self.last_layer = WeightNormDense(out_dim, norm_last_layer=norm_last_layer, dtype=policy, name="last_layer")
        # iBOTHead's separate patch layer; an instance attribute, not a class one: on torch a
        # class attribute would hide the sub-module registered under the same name.
        self.last_layer2 = None

    def build(self, input_shape):
        width = input_shape[-1]
        for layer in self.mlp:
            layer.build((None, width))
            width = layer.units
        for norm in self.norms:
            norm.build((None, self.hidden_dim))
        self.last_layer.build((None, self.bottleneck_dim))
        self.built = True

    def project(self, x):
        """MLP and L2 normalisation (eps 1e-12 as ``F.normalize``): ``(..., bottleneck)``."""
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < len(self.mlp) - 1:  # hidden layers: (BatchNorm,) exact GELU
                if self.norms:
                    x = self.norms[i](x)
                x = keras.activations.gelu(x, approximate=False)
        x32 = ops.cast(x, "float32")
        norm = ops.sqrt(ops.sum(ops.square(x32), axis=-1, keepdims=True))
        return ops.cast(x32 / ops.maximum(norm, 1e-12), x.dtype)

    @property
    def last_layers(self):
        """The weight-normed output layers (those frozen during the first epoch)."""
        return [self.last_layer] if self.last_layer2 is None else [self.last_layer, self.last_layer2]

    def token_logits(self, x):
        """MLP, L2 norm and ``last_layer`` on every token: ``(..., D) -> (..., K)``. The
        PQCL path: CLS, patch and query tokens all go through the CLS projection."""
        return self.last_layer(self.project(x))

    def call(self, x):
        return self.token_logits(x)

    def get_config(self):
        config = super().get_config()
        config.update(
            out_dim=self.out_dim,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            num_layers=self.num_layers,
            norm_last_layer=self.norm_last_layer,
            use_bn=self.use_bn,
        )
        return config
