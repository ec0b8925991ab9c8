# Source on a GPU machine of the device tool (see WORKSPACE.md): installs the carried wheels of
# what the GPU image lacks (.whl/) and points dpjax at the carried data (.data/).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
export DPJAX_DATA_DIR="$PWD/.data" DPJAX_CACHE_DIR=/tmp/dpjax_cache
