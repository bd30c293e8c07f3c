"""The FUSE layer: a sans-IO codec of the kernel protocol, a trio session on /dev/fuse, and a
one-file filesystem that serves an ImageBackend."""
