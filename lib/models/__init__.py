from lib.models.backbones import create_backbone
from lib.models.net import (RetrievalNet, build_network, init_whitening_from_data, network_from_meta,
                            pca_whitening, set_batchnorm_eval)
from lib.models.pooling import POOLING
from lib.models.loading import get_network, load_network, network_from_state  # after net: it imports lib.checkpoint

__all__ = ["RetrievalNet", "build_network", "network_from_meta", "create_backbone", "set_batchnorm_eval",
           "pca_whitening", "init_whitening_from_data", "POOLING", "get_network", "load_network",
           "network_from_state"]
