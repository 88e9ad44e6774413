"""The backbone networks built from MONAI: the embedded small U-Net, SwinUNETR, SegResNet.

Each function builds an untrained network; :mod:`arenaseg.backbones.registry` names them
(``BackboneSpec.network``) and :mod:`arenaseg.backbones.loading` loads their weights.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def small_ct_unet(out_channels: int = 10, feature_channels: int = 16) -> nn.Module:
    """The embedded default: a MONAI ``UNet`` (strided residual units, 2.5 M parameters) giving
    ``feature_channels`` features at full resolution, then PReLU and a 1×1×1 ``classifier``.

    Input ``(B, 1, X, Y, Z)`` with sizes divisible by 16; output ``(B, out_channels, X, Y, Z)``.
    """
    from monai.networks.nets import UNet

    return nn.Sequential(OrderedDict(
        features=UNet(spatial_dims=3, in_channels=1, out_channels=feature_channels,
                      channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=1),
        act=nn.PReLU(),
        classifier=nn.Conv3d(feature_channels, out_channels, kernel_size=1),
    ))


def swin_unetr(out_channels: int = 29, feature_size: int = 48, use_checkpoint: bool = False) -> nn.Module:
    """The paper's backbone: MONAI ``SwinUNETR`` (depths 2,2,2,2; heads 3,6,12,24; window 7;
    instance norm; ``normalize=True``; qkv bias; 62 M parameters at feature size 48).
    Input ``(B, 1, X, Y, Z)``, sizes divisible by 32; output ``(B, out_channels, X, Y, Z)``; head
    ``out.conv.conv``. ``use_checkpoint``: gradient checkpointing in the Swin blocks."""
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=feature_size,
                     depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), norm_name="instance",
                     normalize=True, qkv_bias=True, spatial_dims=3, use_checkpoint=use_checkpoint)


def wholebody_segresnet(out_channels: int = 105) -> nn.Module:
    """MONAI ``SegResNet`` as in the ``wholeBody_ct_segmentation`` bundle (init filters 32, blocks
    down 1,2,2,4, up 1,1,1, dropout 0.2, group norm). Input ``(B, 1, X, Y, Z)``, sizes divisible
    by 8; head ``conv_final.2.conv``."""
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=1, out_channels=out_channels, init_filters=32,
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=0.2)
