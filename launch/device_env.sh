# Source on a GPU machine of the device tool (see WORKSPACE.md): installs the carried wheels of
# what the GPU image lacks (.whl/, filled by launch/device_wheels.sh) and points dpjax at the
# carried data (.data/). Fails at once, naming the module, if dpjax's imports do not resolve.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
export DPJAX_DATA_DIR="$PWD/.data" DPJAX_CACHE_DIR=/tmp/dpjax_cache
python3 -c "import dpjax.main" || {
  echo "device_env: dpjax does not import with the carried wheels (above: the missing module);" \
       "add its wheel to launch/device_wheels.sh" >&2
  return 1
}
