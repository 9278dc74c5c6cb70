# Source on the GPU machine from the project root, after the TVM bundle is staged there
# (see ../shared/gpu/README.md): puts TVM and an uninstalled copy of PIT on PYTHONPATH.
# The stage folders (ir/, schedules/, codegen/) install under pit_compiler.; this lays them
# out the same way without pip, which cannot reach a package index there.
source .gpu/activate.sh
_pit_pkg=/tmp/pit-src
rm -rf "$_pit_pkg" && mkdir -p "$_pit_pkg/pit_compiler"
cp -r pit_compiler/. "$_pit_pkg/pit_compiler/"
for _stage in ir schedules codegen; do cp -r "$_stage" "$_pit_pkg/pit_compiler/$_stage"; done
export PYTHONPATH="$_pit_pkg${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset _pit_pkg _stage
