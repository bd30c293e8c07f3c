"""fuseclone's benchmark against SPEC's anchors: `python -m benchmarks [--quick] [--only ROWS]`.

Modules: `system` (commands, loop devices, mounts, servers, clean-up), `anchors` (loop device,
qemu-storage-daemon, dd, nbdkit, nbdcopy), `subject` (fuseclone driven through its CLI), `fio`
(running fio, parsing its JSON), `rows` (one function per row of SPEC's target list), `stats`
(figures, medians, ratios, targets), `report` (table, JSON, chart).
"""
