/*
 * Run wsi-ircr on the image open in QuPath and import the nuclei (or cells) it finds.
 *
 * Written for QuPath 0.4 and 0.5 (uses only the documented scripting calls of QPEx:
 * getCurrentServer, getSelectedObjects, exportObjectsToGeoJson, importObjectsFromFile,
 * fireHierarchyUpdate). Open it in Automate > Script editor, set the settings below, Run.
 *
 * - The image must be a file OpenSlide reads (SVS, NDPI, MRXS, TIFF, ...), opened with
 *   QuPath's OpenSlide server: wsi-ircr writes level-0 pixels as that server reads them.
 * - With annotations selected, only their regions are segmented (wsi-ircr --roi).
 * - Results go to OUT_DIR/<slide stem>/ (GeoJSON, CSV, overlay, summary.json) and are
 *   imported into the open image as detections (or cells with CELLS_UM > 0).
 */

// ---- settings -------------------------------------------------------------------------
def WSI_IRCR = "wsi-ircr"                                   // the command; a full path if it is not on PATH
def OUT_DIR = System.getProperty("user.home") + "/wsi-ircr-out"
def CELLS_UM = 0.0                                          // > 0: cells grown by up to this many um
def HALO_PX = 96                                            // with cells: >= largest nucleus + 2 x growth (px at 0.25 um/px)
def EXTRA_ARGS = []                                         // e.g. ["--device", "cuda", "--min-area-um2", "5"]

// ---- the open image and the selected annotations ----------------------------------------
def server = getCurrentServer()
if (server == null) {
    println "wsi-ircr: open an image first"
    return
}
def slidePath = new File(server.getURIs()[0]).getAbsolutePath()
def name = new File(slidePath).getName()
def stem = name.contains(".") ? name.substring(0, name.lastIndexOf(".")) : name
if (stem.toLowerCase().endsWith(".ome"))
    stem = stem.substring(0, stem.length() - 4)
def outDir = new File(OUT_DIR).getAbsolutePath()

def annotations = getSelectedObjects().findAll { it.isAnnotation() }
def roiFile = null
if (!annotations.isEmpty()) {
    roiFile = new File(outDir, stem + "-roi.geojson")
    roiFile.getParentFile().mkdirs()
    exportObjectsToGeoJson(annotations, roiFile.getAbsolutePath(), "FEATURE_COLLECTION")
}

// ---- the wsi-ircr command (tests/test_qupath_script.py runs exactly this list) ----------
def command = [WSI_IRCR, "segment", slidePath, "-o", outDir, "--outputs", "geojson,csv", "--set", "gzip=false"]
if (CELLS_UM > 0) command += ["--cells", CELLS_UM.toString(), "--halo", HALO_PX.toString()]
if (roiFile != null) command += ["--roi", roiFile.getAbsolutePath()]
command += EXTRA_ARGS
def resultFile = new File(new File(outDir, stem), stem + ".geojson")

println "wsi-ircr: " + command.join(" ")
def process = new ProcessBuilder(command.collect { it.toString() }).redirectErrorStream(true).start()
process.inputStream.eachLine { println it }
def status = process.waitFor()
if (status != 0 || !resultFile.exists()) {
    println "wsi-ircr: failed (exit status " + status + "); see the lines above"
    return
}

// ---- import the result ----------------------------------------------------------------
importObjectsFromFile(resultFile.getAbsolutePath())
fireHierarchyUpdate()
println "wsi-ircr: imported " + resultFile.getAbsolutePath()
