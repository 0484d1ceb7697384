"""Native low-bit inference: a C decode step over the artifact's packed codes (`itl_step.c`),
its shared library (`library`), its weight layout (`layout`), its ctypes runtime (`runtime`) and its
PyTorch `_ref` twins (`ref`). Import what you need from those modules: this package imports none
of them, so a module that needs only the library (the rANS coder) does not pull in the runtime."""
