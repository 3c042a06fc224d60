import pytest

from dpnotes.testing.tiny_models import tiny_llama_folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny LLaMA with SmolLM2's tokenizer, saved as an HF folder (shared by the session)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_folder(folder)
    return folder
