# The two set-up commands of the README: `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What the product needs (`make demo`), then what the tests need on top (torch, browsers' driver, ...).
RUNTIME := $(VENV)/.runtime-installed
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean bench chaos

$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[dev]'
	# Only the tokenizer ranks of openai-whisper are used (tests): without its dependencies (triton: 1 GB).
	$(BIN)/pip install --quiet --no-deps openai-whisper
	touch $(STAMP)

venv: $(STAMP)

demo: $(RUNTIME)
	$(BIN)/python -m tuberunner demo --output demo-output

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# ffmpeg for the tests (FFMPEG_PATH selects it): the whole suite runs on the imageio-ffmpeg binary, which every
# install has; then, when the system has one at SYSTEM_FFMPEG (Debian's 5.1, which most PeerTube hosts have),
# the tests whose assertions are about what ffmpeg makes or how it fails run again on it: command builders,
# probe and process supervision (media), the processors (and what they copy instead of encoding) and studio
# edits on real files, the one-shot outputs (web videos, HLS layout, audio-only chain, a corrupt input).
# Left out, to keep that run near a minute:
# protocol, coordinator, fault and chaos tests (ffmpeg is only their workload), and the one-shot tests about
# jobs or arguments rather than outputs (interrupt/resume, bad paths, edits already covered by tests/studio).
SYSTEM_FFMPEG ?= /usr/bin/ffmpeg
OUTPUT_TESTS := tests/media tests/runner/test_processors.py tests/runner/test_encode_reuse.py \
	tests/studio/test_commands.py \
	tests/studio/test_studio.py tests/oneshot/test_transcode.py \
	--deselect tests/oneshot/test_transcode.py::test_interrupt_then_resume_redoes_no_completed_job \
	--deselect tests/oneshot/test_transcode.py::test_missing_input_unwritable_output_and_non_video_fail_clearly

# Two pytest workers (pytest-xdist): most tests wait on sockets, ffmpeg or timers rather than compute, so two
# of them share the two cores of a CI machine well (11.5 -> 6.5 min measured); each test has its own ports,
# folders and databases already. PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 2

test: lint
	FFMPEG_PATH="$$($(BIN)/python -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')" \
		$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)
	@if [ -x $(SYSTEM_FFMPEG) ]; then \
		echo "Again on $(SYSTEM_FFMPEG): the tests of what ffmpeg makes"; \
		FFMPEG_PATH=$(SYSTEM_FFMPEG) $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(OUTPUT_TESTS); \
	else \
		echo "No $(SYSTEM_FFMPEG): the tests ran on the bundled ffmpeg only"; \
	fi

bench: $(STAMP)
	$(BIN)/python bench/coordinator_load.py

# The fault matrix (docs/chaos.md): `make chaos` runs 10 minutes; options through ARGS, e.g.
# make chaos ARGS='--duration 60 --runners 2 --videos 4 --seed 7 --json chaos.json'
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py $(ARGS)

clean:
	rm -rf $(VENV) demo-output
