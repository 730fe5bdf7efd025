import os
import sys
from pathlib import Path

# Let tests import their shared factories as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
# Ray on loopback (read once, when Ray is first imported: before any test module imports
# it). Without it, ray.init(address="127.0.0.1:port") is rewritten to the machine's own
# address, where a loopback-only cluster does not listen.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
