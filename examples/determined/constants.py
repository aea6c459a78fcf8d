DATA_DIRECTORY = "/tmp/data/cifar10"
LOCK_FILE = "/tmp/cifar10.lock"
PREDICTIONS_DIRECTORY = "/tmp/inference_out/"
