"""Errors a user can cause. Each carries one clear line for the CLI to print."""


def describe(exc: BaseException) -> str:
    """EXC as one line for a user: an OSError without its "[Errno N]" prefix."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


class FusecloneError(Exception):
    """Base for errors caused by user input or environment; printed as one line, exit 1."""


def user_error(exc: BaseException) -> FusecloneError | None:
    """The FusecloneError behind EXC: EXC itself, or the only error inside the exception groups
    that nurseries wrap around what their tasks raise. None when it is anything else."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, FusecloneError) else None


class MetadataError(FusecloneError):
    """The metadata file is corrupt, of another clone, or of an unknown format."""


# Ends the reason of a failure after which META's last good commit is no use either (what it
# records is gone): no advice to resume from it follows.
CANNOT_RESUME = "the clone cannot resume"


class MetadataFailedError(FusecloneError):
    """A write to META failed, so the live mount writes it no more (dm-clone's fail mode)."""

    def __init__(self, reason: str) -> None:
        advice = ("" if reason.endswith(CANNOT_RESUME)
                  else ": unmount and mount again to resume from the last good commit")
        super().__init__(f"metadata is in fail mode after {reason}{advice}")
        self.reason = reason


def ended_in_fail_mode(reason: str) -> str:
    """What the end of a mount whose metadata is in fail mode says (its daemon's exit status,
    `unmount`): its last commit never happened."""
    advice = "" if reason.endswith(CANNOT_RESUME) else "; mount again to resume from it"
    return (f"the metadata is in fail mode after {reason}, so META keeps its last good commit "
            f"and writes not flushed before the failure may be lost{advice}")


class MetadataInUseError(FusecloneError):
    """Another process holds the metadata file (SPEC invariant 6)."""


class SourceError(FusecloneError):
    """The source cannot be opened or read."""


class DestinationError(FusecloneError):
    """The destination cannot be opened, or is too small."""


class DestinationInUseError(DestinationError):
    """Another clone holds the destination (SPEC invariant 9)."""


class OverlapError(FusecloneError):
    """SRC, DST, META and the mountpoint are not four different things (SPEC invariant 8)."""


class SettingError(FusecloneError, ValueError):
    """A tunable out of its range (a bad value, from the command line or a message)."""


class RegionSizeError(FusecloneError):
    """Region size is not a power of two between 4 KiB and 1 GiB."""


class ImageTooLargeError(FusecloneError):
    """The image is larger than Linux's largest file, or its bitmaps, at its region size,
    need more memory than the machine has."""
