"""Initialization shared by the built-in models (OpenLTH's ``kaiming_normal``)."""
from torch import nn


def kaiming_init_(model: nn.Module) -> nn.Module:
    """Conv/Linear weights ~ Kaiming normal (fan_in), biases 0; BatchNorm weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
