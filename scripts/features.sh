# Sourced by setup.sh and test.sh: the cargo features this machine builds earshot with, in
# $earshot_features (one `cargo` argument list). MPI (data-parallel training, `mpirun -np N
# earshot train`) where Open MPI's development files and libclang are present; setup.sh
# installs them with apt-get when it runs as root.
earshot_features=()
if command -v mpicc >/dev/null 2>&1 && ls /usr/lib/llvm-*/lib/libclang*.so >/dev/null 2>&1; then
  earshot_features=(--features earshot/mpi)
fi
