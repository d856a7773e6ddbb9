process PREPARE {
    tag "${meta.id}"
    label 'process_medium'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.ext.container_cpu }"

    input:
    // rows[i] is the samplesheet row of h5ads[i]: [h5ad: the path the user gave, split: train|test|all, batch: '' or a name]
    tuple val(meta), path(h5ads, stageAs: 'input/?/*'), val(rows)

    output:
    tuple val(meta), path('train.h5ad'), path('test.h5ad'), emit: h5ad
    tuple val(meta), path('prepare.json')                , emit: json
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args    = task.ext.args ?: ''
    def files   = h5ads instanceof List ? h5ads : [h5ads]
    def keys    = meta.condition_keys ?: ''
    def pairs   = [files, rows instanceof List ? rows : [rows]].transpose()
    def lines   = pairs.collect { f, r -> "'${meta.id},${f},${r.split ?: 'all'},${r.batch ?: ''},${keys}'" }.join(' ')
    // messages and prepare.json name the user's paths, not the staged copies
    def sources = pairs.collect { f, r -> "--source '${f}=${r.h5ad}'" }.join(' ')
    """
    printf '%s\\n' 'dataset,h5ad,split,batch,condition_keys' ${lines} > samplesheet.${meta.id}.csv

    sclatent prepare \\
        --samplesheet samplesheet.${meta.id}.csv \\
        --dataset ${meta.id} \\
        --outdir . \\
        ${sources} \\
        ${args}
    """

    stub:
    """
    touch train.h5ad test.h5ad
    echo '{}' > prepare.json
    """
}
