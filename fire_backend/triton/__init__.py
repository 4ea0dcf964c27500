"""Triton Python-backend models. Each ``model.py`` in the repository is a one-line import of a class
here; the math they call lives in the plain modules of ``fire_backend`` and is tested without Triton.
These modules import ``triton_python_backend_utils``, which exists only inside a Triton stub."""
