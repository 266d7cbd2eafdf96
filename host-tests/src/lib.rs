//! A proxy-wasm host on wasmtime that behaves like Envoy.
