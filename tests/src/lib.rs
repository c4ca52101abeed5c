//! End-to-end tests of the stack live in `tests/tests/`. This library is empty.
