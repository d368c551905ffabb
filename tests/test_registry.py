import pytest

from condense.errors import UnknownNameError
from condense.registry import Registry


def test_register_get_and_duplicates():
    r: Registry[int] = Registry("thing")
    r.register("alpha")(1)
    assert r.get("alpha") == 1 and "alpha" in r and r.names() == ["alpha"]
    with pytest.raises(ValueError, match="already registered"):
        r.add("alpha", 2)


def test_unknown_name_suggests_close_and_lists_all():
    r: Registry[int] = Registry("model")
    for i, n in enumerate(["convnet", "convnet_bn", "resnet18"]):
        r.add(n, i)
    with pytest.raises(UnknownNameError) as e:
        r.get("convnte")
    msg = str(e.value)
    assert "'convnte'" in msg and "did you mean 'convnet'" in msg
    assert "valid choices: convnet, convnet_bn, resnet18" in msg
