import pytest

# support.py and fault_suite.py assert on the tests' behalf: pytest explains their failures
# as it does the tests' own (it rewrites test modules and conftest.py by itself).
pytest.register_assert_rewrite("tests.support", "tests.fault_suite")
