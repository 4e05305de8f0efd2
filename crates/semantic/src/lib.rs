//! The semantic server binary: CLI, configuration, wiring and lifecycle.
