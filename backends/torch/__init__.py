"""PyTorch backend (``specdens.backends.torch``): Hessian-vector-product operators for
``nn.Module`` losses and ``torch.distributed`` reduction.

The core engine already runs on torch tensors through array-api-compat: wrap a tensor
with ``specdens.aslinearoperator``. The Hessian operators arrive with the torch backend
issue.
"""
