import pytest
import torch

from dpnotes.testing.tiny_models import tiny_llama_folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny LLaMA with SmolLM2's tokenizer, saved as an HF folder (shared by the session)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_folder(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def console_settings_stay_in_their_test():
    """A command run in-process (dpnotes.console.command) sets the environment for the processes it
    starts (--debug, quiet third-party libraries) and switches logging off: undo both after each test."""
    import logging
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    logging.disable(logging.NOTSET)
