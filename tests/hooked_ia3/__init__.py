"""A test-only adapter method: IA3 with training hooks (tests/test_hooks.py registers it)."""
