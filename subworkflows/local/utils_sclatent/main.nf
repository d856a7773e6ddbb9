/*
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    Pipeline initialisation (--help, parameter validation against nextflow_schema.json) and completion
    (software versions, summary). Written without the nf-schema plugin so that the pipeline runs offline
    with no plugin to download.
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
*/

workflow PIPELINE_INITIALISATION {
    main:
    def schema = readSchema("${projectDir}/nextflow_schema.json")
    if (params.help) {
        log.info(helpMessage(schema))
        System.exit(0)
    }
    if (params.validate_params) {
        validateParameters(schema, params)
    }
    log.info(paramsSummary(schema, params))
    def cap = localCap()
    if (cap) {
        log.info(cap)
    }

    def input = file(params.input, checkIfExists: true)
    ch_samplesheet = channel.value(input)
    base_dir = input.parent.toUriString()

    emit:
    samplesheet = ch_samplesheet    // channel: path(samplesheet.csv)
    base_dir    = base_dir          // value: string
}

workflow PIPELINE_COMPLETION {
    main:
    // software versions reported by every module, one YAML for the run: one mapping per process, its tools inside
    channel.topic('versions')
        .unique()
        .map { process, tool, version -> [process.tokenize(':')[-1], tool, version] }
        .collect(flat: false)
        .map { rows -> versionsYaml(rows) }
        .collectFile(storeDir: "${params.outdir}/pipeline_info", name: 'sclatent_software_versions.yml', newLine: false)

    workflow.onComplete = {
        if (workflow.success) {
            log.info("sclatent: done in ${workflow.duration}; results in ${params.outdir}")
        } else {
            log.error("sclatent: failed; see the error above and ${params.outdir}/pipeline_info")
        }
    }
}

/*
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    FUNCTIONS
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
*/

// flatten the schema's groups into [name: property]
def readSchema(path) {
    def schema = new groovy.json.JsonSlurper().parseText(file(path).text)
    def props = [:]
    schema['$defs'].each { _group, body -> body.properties.each { name, prop -> props[name] = prop + [group: body.title] } }
    return [schema: schema, props: props]
}

// every given param must be in the schema, with the right type / enum / range; required ones must be set
def validateParameters(schema, params) {
    def props = schema.props
    def errors = []
    def ignore = ['help', 'validate_params']
    params.each { name, value ->
        if (name in ignore || name.contains('-')) {
            return
        }
        if (!props.containsKey(name)) {
            // Nextflow also stores a camelCase copy of snake_case params given on the command line
            def snake = name.replaceAll(/([A-Z])/) { m -> '_' + m[1].toLowerCase() }
            if (snake != name && props.containsKey(snake)) {
                return
            }
            def close = props.keySet().min { k -> levenshtein(k, name) }
            errors << "unknown parameter --${name}" + (close && levenshtein(close, name) <= 3 ? " (did you mean --${close}?)" : '')
            return
        }
        def prop = props[name]
        if (value == null) {
            return
        }
        def type = prop.type instanceof List ? prop.type : [prop.type]
        def ok = type.any { t ->
            (t == 'string' && value instanceof CharSequence) ||
            (t == 'integer' && (value instanceof Integer || value instanceof Long)) ||
            (t == 'number' && value instanceof Number) ||
            (t == 'boolean' && value instanceof Boolean) ||
            t == null
        }
        if (!ok) {
            errors << "--${name}: expected ${type.join(' or ')}, got '${value}'"
            return
        }
        if (prop['enum'] && !(value in prop['enum'])) {
            errors << "--${name}: '${value}' is not one of ${prop['enum'].join(', ')}"
        }
        if (prop.minimum != null && value instanceof Number && value < prop.minimum) {
            errors << "--${name}: ${value} is below the minimum ${prop.minimum}"
        }
        if (prop.maximum != null && value instanceof Number && value > prop.maximum) {
            errors << "--${name}: ${value} is above the maximum ${prop.maximum}"
        }
        if (prop.exclusiveMaximum != null && value instanceof Number && value >= prop.exclusiveMaximum) {
            errors << "--${name}: ${value} must be below ${prop.exclusiveMaximum}"
        }
        if (prop.pattern && value instanceof CharSequence && !(value ==~ prop.pattern)) {
            errors << "--${name}: '${value}' does not match ${prop.pattern}"
        }
    }
    schema.schema.required?.each { name ->
        if (params[name] == null) {
            errors << "missing required parameter --${name}"
        }
    }
    schema.schema['$defs'].each { _group, body ->
        body.required?.each { name ->
            if (params[name] == null) {
                errors << "missing required parameter --${name}"
            }
        }
    }
    if (errors) {
        error("Invalid parameters:\n  " + errors.unique().join('\n  ') + "\nRun with --help to list the parameters.")
    }
}

def levenshtein(String a, String b) {
    def d = (0..b.length()).toList()
    (1..a.length()).each { i ->
        def prev = d[0]
        d[0] = i
        (1..b.length()).each { j ->
            def tmp = d[j]
            d[j] = [d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1)].min()
            prev = tmp
        }
    }
    return d[b.length()]
}

// '<process>:\n  <tool>: <version>\n' per process (sorted), from [process, tool, version] rows
def versionsYaml(rows) {
    def byProcess = new TreeMap()
    rows.each { process, tool, version -> byProcess.get(process, new TreeMap()).put(tool, version) }
    return byProcess.collect { process, tools ->
        "${process}:\n" + tools.collect { tool, version -> "  ${tool}: ${version}\n" }.join('')
    }.join('')
}

// the profiles declared in nextflow.config, in their order there
def profileNames() {
    def text = file("${projectDir}/nextflow.config").text
    def block = text.substring(text.indexOf('\nprofiles {'))
    block = block.substring(0, block.indexOf('\n}'))
    return (block =~ /(?m)^ {4}(\w+)\s*\{/).collect { m -> m[1] }
}

def helpMessage(schema) {
    def lines = ["", "sclatent ${workflow.manifest.version}: ${workflow.manifest.description}", "",
                 "Usage: nextflow run main.nf -profile <profile>[,<profile>...] --input samplesheet.csv --outdir results",
                 "Profiles: ${profileNames().join(', ')} (docs/usage.md says what each does)", ""]
    schema.schema['$defs'].each { _group, body ->
        lines << "${body.title}:"
        body.properties.each { name, prop ->
            def values = prop['enum'] ? " One of: ${prop['enum'].join(', ')}." : ''
            def dflt = prop.default != null ? " [default: ${prop.default}]" : ''
            lines << "  --${name.padRight(24)} ${prop.description ?: ''}${values}${dflt}"
        }
        lines << ""
    }
    return lines.join('\n')
}

// On the local executor conf/base.config caps each request at this machine's CPUs and memory: the line that says
// so (null on any other executor, where the labels' requests stand)
def localCap() {
    def executor = workflow.session.config.process?.executor ?: 'local'
    if (executor != 'local') {
        return null
    }
    def cpus = Math.min(params.max_cpus as int, Runtime.runtime.availableProcessors())
    def machine = new nextflow.util.MemoryUnit(java.lang.management.ManagementFactory.operatingSystemMXBean.totalMemorySize)
    def memory = [params.max_memory as nextflow.util.MemoryUnit, machine].min()
    return "local executor: every task asks for at most ${cpus} CPUs and ${memory} " +
        "(this machine: ${Runtime.runtime.availableProcessors()} CPUs, ${machine}; --max_cpus ${params.max_cpus}, --max_memory ${params.max_memory})"
}

def paramsSummary(schema, params) {
    def lines = ["", "sclatent ${workflow.manifest.version}", "-" * 60]
    schema.props.each { name, prop ->
        def value = params[name]
        if (value != null && value != prop.default && value.toString() != '') {
            lines << "  ${name.padRight(24)}: ${value}"
        }
    }
    lines << "  ${'profile'.padRight(24)}: ${workflow.profile}"
    lines << "-" * 60
    return lines.join('\n')
}
