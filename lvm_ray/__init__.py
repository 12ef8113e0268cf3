"""lvm-ray: LVM-AI (Khurshid et al. 2021) on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lvm-ray")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
