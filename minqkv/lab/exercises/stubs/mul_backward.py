"""Exercise mul_backward: the gradient of an elementwise product that broadcasts.

out = a * b, where a and b broadcast like NumPy arrays (a (3, 1) times b (4,) gives (3, 4)).
Given grad = dL/dout, return dL/da and dL/db, each of the shape of its input.
"""

import numpy as np


def sum_to_shape(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Undo broadcasting: sum grad over the axes that broadcasting added or stretched from 1."""
    raise NotImplementedError("your code here")


def mul_backward(a: np.ndarray, b: np.ndarray, grad: np.ndarray) -> tuple:
    """a (shape_a), b (shape_b), grad (broadcast shape) -> (da (shape_a), db (shape_b)).

    Work out d(a*b)/da elementwise first, as if nothing broadcast. Then ask: an element of a
    that broadcasting used for several outputs, which gradients does it receive?
    """
    raise NotImplementedError("your code here")
