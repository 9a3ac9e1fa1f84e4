#!/usr/bin/env bash
# Run an entry script on N CPU processes (gloo), the way a GPU node runs it: for testing distributed code
# without a GPU. `accelerate launch` cannot start several CPU processes without MPI, so this uses torchrun.
#   scripts/cpu_launch.sh 2 train_lt.py --config configs/quickstart_fashion_mnist.yaml     # DDP
#   DEEPSPEED_CONFIG=accelerate_configs/ds_zero2.json scripts/cpu_launch.sh 2 train_lt.py ...   # DeepSpeed ZeRO-2
#   scripts/cpu_launch.sh 2 eval_lt.py outputs/quickstart
set -euo pipefail
nproc=${1:?usage: scripts/cpu_launch.sh NPROC SCRIPT [ARGS...]}
shift
port=${MASTER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [ -n "${DEEPSPEED_CONFIG:-}" ]; then
    export ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_CONFIG_FILE="$DEEPSPEED_CONFIG"
else
    export ACCELERATE_USE_CPU=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python3 -m torch.distributed.run --nproc_per_node "$nproc" --master_addr 127.0.0.1 --master_port "$port" "$@"
