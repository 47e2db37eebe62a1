"""apm-bench: can a personalization method infer how a user wants answers written from their history?

Public plug-in points: `apm_bench.methods.Personalizer` / `register_method`, and the backend
interface in `apm_bench.backends.base`.
"""

__version__ = "0.1.0"
