.PHONY: test lint example matrix bench package
test:
	python3 dev.py test
lint:
	python3 dev.py lint
example:
	python3 dev.py example
matrix:
	python3 dev.py matrix
bench:
	python3 dev.py bench
package:
	python3 dev.py package
