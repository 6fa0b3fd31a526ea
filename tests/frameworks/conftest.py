import os
import sys

# the real-process-group harness and the shared model/data of the distributed tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
