process CHECK_SAMPLESHEET {
    tag "${samplesheet.name}"
    label 'process_single'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.ext.container_cpu }"

    input:
    path samplesheet
    val base_dir

    output:
    path 'samplesheet.valid.csv', emit: csv
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    """
    sclatent check-samplesheet \\
        ${samplesheet} \\
        --base-dir '${base_dir}' \\
        --no-check-exists \\
        --out samplesheet.valid.csv \\
        ${args}
    """

    stub:
    // the same (fast) validation: later stub tasks need the absolute paths it writes
    """
    sclatent check-samplesheet \\
        ${samplesheet} \\
        --base-dir '${base_dir}' \\
        --no-check-exists \\
        --out samplesheet.valid.csv
    """
}
