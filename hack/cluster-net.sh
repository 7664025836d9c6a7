# The local cluster's addresses, shared by cluster-up.sh and cluster-down.sh (sourced).
# Pods live in 10.244.0.0/16 on the bridge (node i owns 10.244.i.0/24); the API server, DNS
# and the kubelets listen on the bridge's own address; Service addresses lead nowhere.
BRIDGE=ccbr0
GATEWAY=10.244.0.1
POD_PREFIX_LEN=16
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1
API_PORT=6443
NFT_TABLE=consensus_dev
NETNS_PREFIX=ccpod-
