# The two commands of the README. Both set themselves up (scripts/setup.sh).
.PHONY: train test setup

train:  ## set up, then train RevNet-38 on Fashion-MNIST (the main job)
	bash scripts/setup.sh --data
	.venv/bin/revnet train $(ARGS)

test:   ## set up, then run the tests and the linter
	bash scripts/setup.sh
	.venv/bin/python -m pytest
	.venv/bin/ruff check .

setup:
	bash scripts/setup.sh --data
