"""The model zoo: ConvNet family, MLP, LeNet, AlexNet, VGG11 and ResNet18 variants.

Use :func:`create_model` with a registry key (``MODELS.names()`` lists them)::

    net = create_model("convnet", channels=1, num_classes=10, im_size=28, generator=g)
    logits = net(x)            # (N, 10)
    feats = net.embed(x)       # (N, 2048)
"""

from __future__ import annotations

# Importing the model modules registers their builders in MODELS.
from condense.models import alexnet, convnet, lenet, mlp, resnet, vgg  # noqa: F401
from condense.models._base import ClassifierNet, has_batchnorm, init_parameters
from condense.models._factory import (
    MODELS,
    count_parameters,
    create_model,
    model_factory,
    model_kwargs,
    reinitialize,
)
from condense.models.alexnet import AlexNet
from condense.models.convnet import ConvNet
from condense.models.lenet import LeNet
from condense.models.mlp import MLP
from condense.models.resnet import ResNet
from condense.models.vgg import VGG

__all__ = [
    "MODELS",
    "AlexNet",
    "ClassifierNet",
    "ConvNet",
    "LeNet",
    "MLP",
    "ResNet",
    "VGG",
    "count_parameters",
    "create_model",
    "model_factory",
    "has_batchnorm",
    "init_parameters",
    "model_kwargs",
    "reinitialize",
]
