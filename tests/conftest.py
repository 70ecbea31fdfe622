import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def chunk_calls(monkeypatch):
    """``(chunk lengths, compile_options)`` of every chunked ensemble call the losses make."""
    import torchrl_bdpo.speed.chunks as chunks_module

    calls = []
    chunked_apply = chunks_module.ensemble_apply_chunked

    def spy(*args, **kwargs):
        calls.append((list(args[4]), kwargs.get("compile_options")))
        return chunked_apply(*args, **kwargs)

    monkeypatch.setattr(chunks_module, "ensemble_apply_chunked", spy)
    return calls


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
