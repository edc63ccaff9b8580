"""TensorFlow backend (``specdens.backends.tf``): Hessian-vector-product operators for
Keras models and ``tf.distribute`` reduction, and the TensorFlow array namespace the
engine needs. They arrive with the TensorFlow backend issue.
"""
