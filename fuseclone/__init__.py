"""fuseclone: dm-clone rebuilt in userspace as a trio FUSE filesystem."""

__version__ = "0.1.0"
