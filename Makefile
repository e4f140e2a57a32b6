.PHONY: test lint example
test:
	python3 dev.py test
lint:
	python3 dev.py lint
example:
	python3 dev.py example
