process PREPARE {
    tag "${meta.id}"
    label 'process_medium'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.ext.container_cpu }"

    input:
    tuple val(meta), path(h5ads, stageAs: 'input/?/*'), val(splits), val(batches)

    output:
    tuple val(meta), path('train.h5ad'), path('test.h5ad'), emit: h5ad
    tuple val(meta), path('prepare.json')                , emit: json
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args  = task.ext.args ?: ''
    def files = h5ads instanceof List ? h5ads : [h5ads]
    def keys  = meta.condition_keys ?: ''
    def rows  = [files, splits, batches].transpose().collect { f, s, b -> "${meta.id},${f},${s},${b ?: ''},${keys}" }
    def quoted = rows.collect { r -> "'${r}'" }.join(' ')
    """
    printf '%s\\n' 'dataset,h5ad,split,batch,condition_keys' ${quoted} > samplesheet.${meta.id}.csv

    sclatent prepare \\
        --samplesheet samplesheet.${meta.id}.csv \\
        --dataset ${meta.id} \\
        --outdir . \\
        ${args}
    """

    stub:
    """
    touch train.h5ad test.h5ad
    echo '{}' > prepare.json
    """
}
