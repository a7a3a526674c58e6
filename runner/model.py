"""build_unet(plan.network, ...) -> keras.Model: the plan's 3D U-Net, channels-last."""
from __future__ import annotations

import keras
from keras import layers

from planner.plan import NetworkSection


def _conv_block(x, filters: int, kernel, net: NetworkSection, name: str):
    for i in range(net.convs_per_stage):
        x = layers.Conv3D(filters, tuple(kernel), padding="same", use_bias=net.normalization == "none",
                          name=f"{name}_conv{i}")(x)
        if net.normalization == "batch":
            x = layers.BatchNormalization(momentum=net.batchnorm_momentum, name=f"{name}_bn{i}")(x)
        x = (layers.ReLU(name=f"{name}_relu{i}") if net.activation == "relu"
             else layers.LeakyReLU(0.01, name=f"{name}_lrelu{i}"))(x)
    return x


def build_unet(net: NetworkSection, in_channels: int, n_classes: int) -> keras.Model:
    """Encoder: conv blocks with max-pooling; decoder: transposed convolution (or upsampling + conv),
    concatenation skip, conv block; 1x1x1 softmax head (float32 even under mixed precision)."""
    inputs = keras.Input((None, None, None, in_channels), name="image")  # any patch the pooling divides
    x, skips = inputs, []
    last = len(net.filters) - 1
    for s, (f, k) in enumerate(zip(net.filters, net.kernel_sizes)):
        x = _conv_block(x, f, k, net, f"enc{s}")
        if s < last:
            skips.append(x)
            x = layers.MaxPooling3D(tuple(net.pool_sizes[s]), name=f"pool{s}")(x)
    for s in range(last - 1, -1, -1):
        f, pool = net.filters[s], tuple(net.pool_sizes[s])
        if net.upsampling == "transpose":
            x = layers.Conv3DTranspose(f, pool, strides=pool, name=f"up{s}")(x)
        else:
            x = layers.UpSampling3D(pool, name=f"up{s}")(x)
            x = layers.Conv3D(f, 1, name=f"up{s}_proj")(x)
        x = layers.Concatenate(name=f"skip{s}")([x, skips[s]])
        x = _conv_block(x, f, net.kernel_sizes[s], net, f"dec{s}")
    logits = layers.Conv3D(n_classes, 1, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="softmax")(logits)
    return keras.Model(inputs, outputs, name="segplan_unet")
