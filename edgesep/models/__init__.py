"""Model registry and the models (imports torch).

``create_model(name, **kwargs)`` builds a registered model from JSON-serializable kwargs; ``list_models("kron*")``
lists names by fnmatch pattern. Every model takes pixels in [0, 1]: normalization is its first layer.

The builders live in their modules (``edgesep.models.vgg.vgg16`` ...); importing this package registers them.
"""

# importing the model modules registers their builders
from edgesep.models import cnn, convex, lenet, mlp, resnet, tt, vgg, vit  # noqa: F401
from edgesep.models._common import FCHead, Normalize, balanced_factors, load_pretrained
from edgesep.models._registry import create_model, get_model_builder, is_model, list_models, register_model
from edgesep.models.cnn import CNNSmall
from edgesep.models.convex import ConvexSmall
from edgesep.models.lenet import LeNet5
from edgesep.models.mlp import MLP
from edgesep.models.resnet import CifarResNet
from edgesep.models.vgg import VGG
from edgesep.models.vit import KronTokenLinear, ViT

__all__ = [
    "MLP",
    "VGG",
    "CNNSmall",
    "CifarResNet",
    "ConvexSmall",
    "FCHead",
    "KronTokenLinear",
    "LeNet5",
    "Normalize",
    "ViT",
    "balanced_factors",
    "create_model",
    "get_model_builder",
    "is_model",
    "list_models",
    "load_pretrained",
    "register_model",
]
