"""Shared fixtures: every test runs offline, on CPU, on the tiny random-weight stack.

The tiny models are built once per test run into a temporary IMG_TINY_DIR (set here, before any test
imports img_core, so subprocesses such as the app under test inherit it).
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_CREATED_TINY_DIR = None
if "IMG_TINY_DIR" not in os.environ:
    _CREATED_TINY_DIR = tempfile.mkdtemp(prefix="img-tiny-")
    os.environ["IMG_TINY_DIR"] = _CREATED_TINY_DIR
# Apps started by tests keep their History (ui.history) in a folder of this run, not the user's cache.
_CREATED_DATA_DIR = tempfile.mkdtemp(prefix="img-studio-data-")
os.environ["IMG_STUDIO_DATA"] = _CREATED_DATA_DIR


def pytest_sessionfinish(session, exitstatus):
    """Remove the tiny models this run built (a caller-provided IMG_TINY_DIR is kept)."""
    if _CREATED_TINY_DIR:
        shutil.rmtree(_CREATED_TINY_DIR, ignore_errors=True)
    shutil.rmtree(_CREATED_DATA_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_root() -> Path:
    """The folder holding all tiny models (built on first use)."""
    from img_core.tiny.models import ensure_tiny_models

    return ensure_tiny_models(Path(os.environ["IMG_TINY_DIR"]))


@pytest.fixture(scope="session")
def tiny_sdxl_session(tiny_root):
    """One loaded tiny-sdxl session shared by the tests that only read from it."""
    from img_core.session import IMGSession

    return IMGSession.from_preset("tiny-sdxl", device="cpu", show_progress_bars=False).load()


@pytest.fixture(scope="session")
def tiny_flux_session(tiny_root):
    from img_core.session import IMGSession

    return IMGSession.from_preset("tiny-flux", device="cpu", show_progress_bars=False).load()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



SLOW_MODULES = {"test_app_browser", "test_app_e2e", "test_report_browser"}  # Chromium or a served app throughout
SLOW_FIXTURES = {"app"}  # a test that talks to app.py running as a subprocess
SLOW_TESTS = {  # tests that start interpreters or several processes of their own
    "test_refine_two_rounds_writes_images_and_session", "test_refine_from_users_image_quietly",
    "test_killed_midway_then_rerun_gives_a_complete_loadable_folder",
    "test_two_processes_split_the_shards_and_write_the_same_store",
    "test_a_killed_run_resumes_to_the_same_weights", "test_two_process_run_resumes_bitwise",
    "test_importing_app_loads_nothing_and_binds_localhost",
    "test_imagereward_equals_the_released_package_on_tiny_weights",
    "test_conversion_and_text_cleanup_match_open_clip_itself",
    "test_convert_llava_and_prepare_share_one_lock", "test_two_apps_folders_are_locked_and_removed_at_exit",
    "test_served_files_age_out_after_the_set_minutes",  # serves the app and waits for Gradio's clean-up
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: browser, subprocess or multi-process test (`make test` runs them, `make test-fast` skips them)"
    )


def pytest_collection_modifyitems(config, items):
    """Mark the slow tests of the modules above; new slow tests carry `@pytest.mark.slow` themselves."""
    for item in items:
        if (item.module.__name__.rpartition(".")[2] in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames)
                or item.originalname in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
