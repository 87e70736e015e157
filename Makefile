GO ?= go
BIN := bin/nodespawn

.PHONY: build test vet fmt dry-run
build:
	$(GO) build -o $(BIN) .

test:
	$(GO) vet ./...
	$(GO) test ./...

dry-run: build
	./$(BIN) apply --dry-run -f examples/minimal.yaml
