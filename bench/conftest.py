import os
import sys

# make `import bench` work when pytest is pointed at bench/ from a checkout
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
