"""build_unet(plan.network, ...) -> keras.Model: the plan's U-Net, channels-last, 3D or (a 2d plan's
network, two values per kernel and pool) 2D from the same code: the layers of either are looked
up by the number of spatial axes (``_ops``), as nnU-Net's networks take their ``conv_op``.

Two encoders share one decoder: ``plain`` (the paper: convolution blocks and max-pooling) and
``residual_encoder`` (nnU-Net's ResEnc U-Net, dynamic_network_architectures' ResidualEncoderUNet:
a stem convolution, then per stage residual blocks of two convolutions in ResNet-D form, the
first block of a stage down-sampling by its stride with an average-pooled skip). With deep
supervision the model has one softmax output per supervised level (segplan.planner.plan.supervised_levels),
full resolution first; ``prediction_model`` keeps only that one for inference. A region plan's
heads are sigmoids, one channel per region (``plan_network``).
"""
from __future__ import annotations

import keras
import numpy as np
from keras import layers

from segplan.planner.labels import label_model
from segplan.planner.plan import NetworkSection, Plan, input_channels, spatial_dims, supervised_levels

# Keras layers per number of spatial axes: convolution, transposed convolution, max and average
# pooling, nearest up-sampling
_LAYERS = {2: (layers.Conv2D, layers.Conv2DTranspose, layers.MaxPooling2D, layers.AveragePooling2D,
               layers.UpSampling2D),
           3: (layers.Conv3D, layers.Conv3DTranspose, layers.MaxPooling3D, layers.AveragePooling3D,
               layers.UpSampling3D)}


def _ops(net: NetworkSection) -> dict:
    """The layer classes of the network's number of spatial axes."""
    return dict(zip(("conv", "transpose", "max_pool", "average_pool", "upsample"), _LAYERS[spatial_dims(net)]))


def _norm(x, net: NetworkSection, name: str, index: str = ""):
    """The plan's normalization after a convolution: batch (the paper; moving statistics at
    inference), instance (nnU-Net's: each image's own statistics per channel, the same in training
    and inference, independent of the batch size) or none. The layer: ``name``_bn``index`` (_in for instance)."""
    if net.normalization == "batch":
        return layers.BatchNormalization(momentum=net.batchnorm_momentum, name=f"{name}_bn{index}")(x)
    if net.normalization == "instance":  # GroupNormalization with a group per channel = instance norm
        return layers.GroupNormalization(groups=-1, epsilon=1e-5, name=f"{name}_in{index}")(x)
    return x


def _norm_act(x, net: NetworkSection, name: str, activate: bool = True):
    x = _norm(x, net, name)
    if not activate:
        return x
    return (layers.ReLU(name=f"{name}_relu") if net.activation == "relu"
            else layers.LeakyReLU(0.01, name=f"{name}_lrelu"))(x)


def _conv_block(x, filters: int, kernel, net: NetworkSection, name: str, convs: int | None = None):
    """``convs`` (default: convs_per_stage) times convolution + norm + activation (layer names as before)."""
    for i in range(net.convs_per_stage if convs is None else convs):
        x = _ops(net)["conv"](filters, tuple(kernel), padding="same", use_bias=net.normalization == "none",
                              name=f"{name}_conv{i}")(x)
        x = _norm(x, net, name, str(i))
        x = (layers.ReLU(name=f"{name}_relu{i}") if net.activation == "relu"
             else layers.LeakyReLU(0.01, name=f"{name}_lrelu{i}"))(x)
    return x


def _residual_block(x, filters: int, kernel, stride, net: NetworkSection, name: str):
    """ResNet-D basic block: conv-norm-act, conv-norm, plus the skip (average-pooled when strided,
    projected by a 1x1 convolution + norm when the channels change), then the activation."""
    bias, ops = net.normalization == "none", _ops(net)
    skip = x
    if any(s != 1 for s in stride):
        skip = ops["average_pool"](tuple(stride), name=f"{name}_skip_pool")(skip)
    if x.shape[-1] != filters:
        skip = ops["conv"](filters, 1, use_bias=False, name=f"{name}_skip_conv")(skip)
        skip = _norm_act(skip, net, f"{name}_skip", activate=False)
    y = ops["conv"](filters, tuple(kernel), strides=tuple(stride), padding="same", use_bias=bias,
                    name=f"{name}_conv0")(x)
    y = _norm_act(y, net, f"{name}_0")
    y = ops["conv"](filters, tuple(kernel), padding="same", use_bias=bias, name=f"{name}_conv1")(y)
    y = _norm_act(y, net, f"{name}_1", activate=False)
    y = layers.Add(name=f"{name}_add")([y, skip])
    return (layers.ReLU(name=f"{name}_relu") if net.activation == "relu"
            else layers.LeakyReLU(0.01, name=f"{name}_lrelu"))(y)


def _plain_encoder(x, net: NetworkSection) -> list:
    """Each stage's output, first to last (the bottleneck)."""
    outs = []
    for s, (f, k) in enumerate(zip(net.filters, net.kernel_sizes)):
        if s > 0:
            x = _ops(net)["max_pool"](tuple(net.pool_sizes[s - 1]), name=f"pool{s - 1}")(x)
        x = _conv_block(x, f, k, net, f"enc{s}")
        outs.append(x)
    return outs


def _residual_encoder(x, net: NetworkSection) -> list:
    x = _conv_block(x, net.filters[0], net.kernel_sizes[0], net, "stem", convs=1)
    outs = []
    for s, (f, k, n) in enumerate(zip(net.filters, net.kernel_sizes, net.blocks_per_stage)):
        for b in range(n):
            stride = net.pool_sizes[s - 1] if s > 0 and b == 0 else [1] * spatial_dims(net)
            x = _residual_block(x, f, k, stride, net, f"enc{s}_block{b}")
        outs.append(x)
    return outs


def _head(x, net: NetworkSection, n_classes: int, suffix: str, activation: str = "softmax"):
    logits = _ops(net)["conv"](n_classes, 1, name=f"logits{suffix}")(x)
    return layers.Activation(activation, dtype="float32", name=f"{activation}{suffix}")(logits)


def plan_network(plan: Plan) -> keras.Model:
    """The network a plan trains and predicts with: a softmax over its labels, or for a region plan
    one sigmoid per region (overlapping regions are not exclusive); its logits' biases start at
    ``training.output_bias`` where given."""
    lm = label_model(plan)
    model = build_unet(plan.network, input_channels(plan), lm.n_outputs, lm.activation)
    if plan.training.output_bias:   # training starts from the prior (trained or loaded weights replace it)
        for layer in model.layers:
            if layer.name.startswith("logits"):
                kernel, _ = layer.get_weights()
                layer.set_weights([kernel, np.asarray(plan.training.output_bias, kernel.dtype)])
    return model


def build_unet(net: NetworkSection, in_channels: int, n_classes: int, activation: str = "softmax") -> keras.Model:
    """Encoder (``net.architecture``); decoder: transposed convolution (or upsampling + conv),
    concatenation skip, conv block; a 1x1(x1) softmax (or ``activation``) head (float32 even under
    mixed precision) at full resolution and, with deep supervision, at every further supervised
    decoder stage."""
    if net.architecture == "residual_encoder" and len(net.blocks_per_stage) != len(net.filters):
        raise ValueError(f"network.blocks_per_stage {net.blocks_per_stage}: a residual encoder of {len(net.filters)} "
                         f"stages needs {len(net.filters)} block counts")
    ops = _ops(net)
    inputs = keras.Input((None,) * spatial_dims(net) + (in_channels,), name="image")  # any patch the pooling divides
    encoder = _residual_encoder if net.architecture == "residual_encoder" else _plain_encoder
    stages = encoder(inputs, net)
    levels = {lv.stage for lv in supervised_levels(net)}
    x, outputs = stages[-1], {}
    for s in range(len(net.filters) - 2, -1, -1):
        f, pool = net.filters[s], tuple(net.pool_sizes[s])
        if net.upsampling == "transpose":
            x = ops["transpose"](f, pool, strides=pool, name=f"up{s}")(x)
        else:
            x = ops["upsample"](pool, name=f"up{s}")(x)
            x = ops["conv"](f, 1, name=f"up{s}_proj")(x)
        x = layers.Concatenate(name=f"skip{s}")([x, stages[s]])
        x = _conv_block(x, f, net.kernel_sizes[s], net, f"dec{s}")
        if s in levels and s > 0:
            outputs[s] = _head(x, net, n_classes, f"_ds{s}", activation)
    outputs[0] = _head(x, net, n_classes, "", activation)
    heads = [outputs[s] for s in sorted(outputs)]
    return keras.Model(inputs, heads if len(heads) > 1 else heads[0], name="segplan_unet")


def prediction_model(model: keras.Model) -> keras.Model:
    """The full-resolution output alone (shares the weights): what predicts, whatever trained."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.inputs, model.outputs[0], name=f"{model.name}_full_resolution")
