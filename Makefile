# Two commands for a newcomer: `make app` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed

.PHONY: app test lint bench figures report-example clean

# the app needs the runtime only; the tests also the peers they compare against
$(RUNTIME): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $(RUNTIME)

$(STAMP): $(RUNTIME) requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

app: $(RUNTIME)
	$(BIN)/streamlit run app.py

# the tests run one torch thread each, so two workers use both cores of a laptop or CI box
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

lint: $(STAMP)
	$(BIN)/ruff check models viz bench tests app.py lens_app
	$(BIN)/ruff format --check models viz bench tests app.py lens_app

bench: $(STAMP)
	$(BIN)/python -m bench

# the README's two paper figures, from the embedded checkpoints
GRID_IMAGES := $(addprefix samples/,tench_12881.jpg english_springer_4972.jpg church_29612.jpg \
	garbage_truck_10362.jpg golf_ball_501.jpg parachute_21932.jpg)
BAM_IMAGE := garbage_truck_10362
# the embedded hybrid CNN + ViT: a row of the grid and the transformer figure
VIT ?= $(wildcard checkpoints/resnet18_cbam_vit_hybrid_imagenette.safetensors)
VIT_IMAGE := english_springer_4972
figures: $(STAMP)
	rm -rf out/figures
	$(BIN)/python -m viz export --images $(GRID_IMAGES) --figure model-grid --dpi 150 --labels samples/labels.csv \
		--out out/figures/grid $(foreach m,plain se bam cbam,--checkpoint checkpoints/resnet18_$(m)_imagenette.safetensors) \
		$(foreach v,$(VIT),--checkpoint $(v))
	$(BIN)/python -m viz export --checkpoint checkpoints/resnet18_bam_imagenette.safetensors \
		--images samples/$(BAM_IMAGE).jpg --figure bam-hierarchy --width single --dpi 200 --out out/figures/bam
	cp out/figures/grid/model-grid.png docs/model-grid.png
	cp out/figures/bam/resnet18_bam_imagenette/$(BAM_IMAGE)/bam-hierarchy.png docs/bam-hierarchy.png
ifneq ($(VIT),)
	$(BIN)/python -m viz export --checkpoint $(VIT) --images samples/$(VIT_IMAGE).jpg --figure overview --scale per-map \
		--dpi 150 --out out/figures/vit
	cp out/figures/vit/$(basename $(notdir $(VIT)))/$(VIT_IMAGE)/overview.png docs/vit-overview.png
endif

# the README's report excerpt: the embedded checkpoints on the bundled samples
report-example: $(STAMP)
	$(BIN)/python -m viz report --images samples --labels samples/labels.csv --out out/report \
		--overwrite --deletion all --sanity 8 --steps 16 --workers 1 \
		$(foreach m,plain se bam cbam,--checkpoint checkpoints/resnet18_$(m)_imagenette.safetensors)
	cp out/report/figures/sanity.png docs/report-sanity.png

clean:
	rm -rf $(VENV) .pytest_cache
