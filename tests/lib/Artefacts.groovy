import groovy.json.JsonSlurper
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.security.MessageDigest
import java.util.zip.ZipFile

/*
    What the nf-test specs read of sclatent's artefacts (nf-test's `libDir`, tests/lib): the package version, the
    signatures of HDF5 / zip files, numpy .npz arrays, an .h5ad summary (through the Python the tasks use), and the
    parts of a JSON record that are the same on every machine and every run (for snapshots).
*/
class Artefacts {

    // keys whose values depend on the machine, the clock or the folder a test runs in: left out of snapshots
    static final List<String> VOLATILE = ['elapsed_s', 'seconds', 'provenance', 'python', 'platform', 'created',
                                          'threads', 'device', 'path', 'h5ad', 'inputs', 'sha256']

    // the package version, from the sources the tasks run
    static String version(projectDir) {
        def text = new File("${projectDir}/python/src/sclatent/__init__.py").text
        return (text =~ /__version__ = "([^"]+)"/)[0][1]
    }

    static byte[] head(path, int n) {
        def f = new File(path.toString())
        def b = new byte[n]
        if (!f.isFile() || f.length() < n) {
            return new byte[0]
        }
        f.withInputStream { s -> s.read(b) }
        return b
    }

    // an .h5ad is an HDF5 file: its 8-byte signature (a stub or a truncated write has none)
    static boolean isHdf5(path) {
        return head(path, 8) == ([0x89, 0x48, 0x44, 0x46, 0x0d, 0x0a, 0x1a, 0x0a] as byte[])
    }

    // torch checkpoints and numpy .npz files are zip archives
    static boolean isZip(path) {
        return head(path, 2) == ([0x50, 0x4b] as byte[])
    }

    static List<String> zipEntries(path) {
        def zip = new ZipFile(path.toString())
        try {
            return zip.entries().collect { e -> e.name }.sort()
        } finally {
            zip.close()
        }
    }

    // the bytes of the zip entries whose name ends with `suffix` (e.g. a torch checkpoint's data.pkl)
    static byte[] zipEntry(path, String suffix) {
        def zip = new ZipFile(path.toString())
        try {
            def entry = zip.entries().find { e -> e.name.endsWith(suffix) }
            assert entry != null : "${path} has no entry *${suffix}"
            return zip.getInputStream(entry).bytes
        } finally {
            zip.close()
        }
    }

    /*
        One array of a numpy .npz, as [shape: [..], values: [..]]: the .npy v1/v2/v3 header and little-endian
        int32/int64/float32/float64 data; other dtypes come back with values = null.
    */
    static Map npz(path, String name) {
        def zip = new ZipFile(path.toString())
        try {
            def entry = zip.getEntry("${name}.npy")
            assert entry != null : "${path} has no array '${name}'"
            def bytes = zip.getInputStream(entry).bytes
            def buf = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)
            assert bytes[0] == (byte) 0x93 && new String(bytes, 1, 5, 'US-ASCII') == 'NUMPY' : "${path}:${name} is not .npy"
            int major = bytes[6]
            int start = major == 1 ? 10 : 12
            int headerLen = major == 1 ? (buf.getShort(8) & 0xffff) : buf.getInt(8)
            def header = new String(bytes, start, headerLen, 'US-ASCII')
            def descr = (header =~ /'descr':\s*'([^']+)'/)[0][1]
            def shape = (header =~ /'shape':\s*\(([^)]*)\)/)[0][1].split(',').findAll { s -> s.trim() }.collect { s -> s.trim() as long }
            long n = shape.inject(1L) { a, b -> a * b }
            buf.position(start + headerLen)
            def read = ['<i4': { buf.getInt() }, '<i8': { buf.getLong() }, '<f4': { buf.getFloat() }, '<f8': { buf.getDouble() }][descr]
            return [shape: shape, dtype: descr, values: read == null ? null : (0L..<n).collect { _i -> read() }]
        } finally {
            zip.close()
        }
    }

    static final String H5AD_SUMMARY = '''
import hashlib, json, sys
import anndata as ad, numpy as np, scipy.sparse as sp
a = ad.read_h5ad(sys.argv[1])
X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
print(json.dumps({
    "n_obs": a.n_obs, "n_vars": a.n_vars,
    "obs_names": a.obs_names.tolist(), "var_names": a.var_names.tolist(),
    "obs": {c: a.obs[c].astype(str).tolist() for c in a.obs.columns},
    "var": sorted(map(str, a.var.columns)), "obsm": sorted(a.obsm), "layers": sorted(a.layers),
    "rows": [hashlib.sha1(np.ascontiguousarray(r, dtype=np.float64).tobytes()).hexdigest()[:12] for r in X],
    "x": {"sparse": bool(sp.issparse(a.X)), "finite": bool(np.isfinite(X).all()), "min": float(X.min()) if X.size else 0.0,
          "sum": float(X.sum()), "integer": bool((X == np.round(X)).all())},
    "uns": a.uns.get("sclatent", {}),
}, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
'''

    /*
        What a test reads of an .h5ad, through the Python the tasks use (nothing on nf-test's classpath reads
        HDF5): $SCLATENT_PYTHON, else the repository's .venv (`make venv`), else python3, the order of bin/sclatent.
        n_obs, n_vars, obs_names, var_names, obs columns as strings, var / obsm / layers names, a hash of each row
        of X, X stats and uns['sclatent'].
    */
    static Map h5ad(projectDir, path) {
        def venv   = new File("${projectDir}/.venv/bin/python")
        def python = System.getenv('SCLATENT_PYTHON') ?: (venv.canExecute() ? venv.path : 'python3')
        def proc   = [python, '-c', H5AD_SUMMARY, path.toString()].execute()
        def out    = new StringBuilder()
        def err    = new StringBuilder()
        proc.waitForProcessOutput(out, err)
        assert proc.exitValue() == 0 : "reading ${path} with ${python} failed: ${err}"
        return new JsonSlurper().parseText(out.toString())
    }

    // a JSON record without the machine-, clock- and folder-dependent keys (at any depth), for snapshots
    static Object stable(obj) {
        if (obj instanceof Map) {
            return obj.findAll { k, _v -> !(k in VOLATILE) }.collectEntries { k, v -> [k, stable(v)] }
        }
        if (obj instanceof List) {
            return obj.collect { v -> stable(v) }
        }
        return obj
    }

    // the keys of a nested JSON record, as sorted 'a.b.c' paths (numbers and lists of numbers are leaves)
    static List<String> keyPaths(obj, String prefix = '') {
        if (obj instanceof Map) {
            return obj.collectMany { k, v -> keyPaths(v, prefix ? "${prefix}.${k}" : "${k}") }.sort()
        }
        return [prefix]
    }

    // a short digest of a list of strings (e.g. a 500-gene vocabulary), for snapshots
    static String digest(List values) {
        def md = MessageDigest.getInstance('SHA-256')
        md.update(values.join('\n').getBytes('UTF-8'))
        return md.digest().encodeHex().toString().take(16)
    }

    // the lines of a task's output that hold `text` (error tests: the one-line message)
    static List<String> linesWith(List<String> lines, String text) {
        return lines.findAll { line -> line.contains(text) }
    }

    /*
        The files each task of a run made itself (not its staged inputs, which are links, nor Nextflow's hidden
        .command.* files) that are not where the task publishes: [task name: [relative paths]], empty when every
        output was published. `publishDir` maps (step, tag) to the folder under outputDir, or null for a step
        that publishes nothing.
    */
    static Map unpublished(String workDir, String outputDir, Closure publishDir) {
        def missing = [:]
        new File(workDir).eachDir { prefix ->
            prefix.eachDir { task ->
                def run = new File(task, '.command.run')
                def name = run.exists() ? (run.text =~ /(?m)^### name: '([^']+)'/) : null
                if (!name) {
                    return
                }
                def (full, tag) = (name[0][1] =~ /^(\S+) \((.*)\)$/)[0][1..2]
                def folder = publishDir(full.tokenize(':')[-1], tag)
                if (folder == null) {
                    return
                }
                def root = task.toPath()
                // Files.walk does not follow links: staged inputs (links to files or folders) are left out
                def stream = java.nio.file.Files.walk(root)
                try {
                    stream.filter { p -> java.nio.file.Files.isRegularFile(p, java.nio.file.LinkOption.NOFOLLOW_LINKS) }.each { p ->
                        def rel = root.relativize(p)
                        def hidden = rel.iterator().any { part -> part.toString().startsWith('.') }
                        // published under its path in the task, or under its name alone (a saveAs that flattens, EMBED's)
                        def published = new File("${outputDir}/${folder}/${rel}").isFile() ||
                            new File("${outputDir}/${folder}/${p.fileName}").isFile()
                        if (!hidden && !published) {
                            missing.get(name[0][1], []) << rel.toString()
                        }
                    }
                } finally {
                    stream.close()
                }
            }
        }
        return missing
    }

    // how many tasks of a run's work folder made at least one file (a guard that `unpublished` looked at them)
    static int tasksWithFiles(String workDir) {
        def n = 0
        new File(workDir).eachDir { prefix -> prefix.eachDir { task -> if (new File(task, '.command.run').exists()) { n++ } } }
        return n
    }
}
