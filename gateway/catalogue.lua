-- One catalogue across pools: the answer to ListModels (GET /api/v3/models is the same call once
-- transcoded) names every model of every pool. It runs after the transcoder, so it sees gRPC for
-- JSON and gRPC callers alike, and only on the ListModels route (gateway/envoy_config.py fills in
-- the ${...} values). The fallback pool answers the call; this asks every other pool the same and
-- merges. A ListModelsResponse is `repeated ModelInfo models = 1`, so the merged message is the
-- entries of every answer, each model once (from its own pool first), sorted by name.
-- A pool that cannot answer (none of its replicas healthy) is left out; the call still succeeds.

local OTHER_POOLS = ${other_pools}
local ANSWERING_MODEL = ${answering_model}  -- the model of the pool that answered, nil: any model
local TIMEOUT_MS = ${timeout_ms}
local LIST_MODELS = "/esm.v1.Esm2Service/ListModels"

-- Protobuf wire format, as much as ModelInfo needs: varints, lengths, skipping other fields.
local function read_varint(bytes, pos)
  local value, scale = 0, 1
  while pos <= #bytes do
    local byte = bytes:byte(pos)
    value = value + (byte % 128) * scale
    pos = pos + 1
    if byte < 128 then
      return value, pos
    end
    scale = scale * 128
  end
  return nil, pos
end

local function write_varint(value)
  local out = {}
  repeat
    local low = value % 128
    value = (value - low) / 128
    out[#out + 1] = string.char(value > 0 and low + 128 or low)
  until value == 0
  return table.concat(out)
end

-- The fields of a message: calls visit(field number, bytes of a length-delimited value) and
-- skips the rest. False if the message is malformed.
local function each_field(bytes, visit)
  local pos = 1
  while pos <= #bytes do
    local tag
    tag, pos = read_varint(bytes, pos)
    if tag == nil then
      return false
    end
    local field, wire = math.floor(tag / 8), tag % 8
    if wire == 0 then
      local _
      _, pos = read_varint(bytes, pos)
      if _ == nil then
        return false
      end
    elseif wire == 1 then
      pos = pos + 8
    elseif wire == 5 then
      pos = pos + 4
    elseif wire == 2 then
      local length
      length, pos = read_varint(bytes, pos)
      if length == nil or pos + length - 1 > #bytes then
        return false
      end
      visit(field, bytes:sub(pos, pos + length - 1))
      pos = pos + length
    else
      return false
    end
  end
  return pos == #bytes + 1
end

-- {name, bytes} of each ModelInfo in one gRPC frame holding a ListModelsResponse; nil if it is not one.
local function models_of(frame)
  if frame == nil or #frame < 5 or frame:byte(1) ~= 0 then
    return nil  -- short, or compressed
  end
  local length = ((frame:byte(2) * 256 + frame:byte(3)) * 256 + frame:byte(4)) * 256 + frame:byte(5)
  if length ~= #frame - 5 then
    return nil
  end
  local models = {}
  local ok = each_field(frame:sub(6), function(field, info)
    if field == 1 then
      local name
      each_field(info, function(f, value)
        if f == 1 and name == nil then
          name = value
        end
      end)
      models[#models + 1] = {name = name or "", bytes = info}
    end
  end)
  return ok and models or nil
end

local function ask(handle, pool, authorization)
  local headers = {
    [":method"] = "POST", [":path"] = LIST_MODELS, [":authority"] = "esm2",
    ["content-type"] = "application/grpc", ["te"] = "trailers",
  }
  if authorization ~= nil then
    headers["authorization"] = authorization
  end
  local reply_headers, body = handle:httpCall(pool.cluster, headers, "\0\0\0\0\0", TIMEOUT_MS)
  if reply_headers[":status"] ~= "200" or reply_headers["grpc-status"] ~= nil then
    return nil  -- down, or an error answered in the headers (trailers-only)
  end
  return models_of(body)
end

function envoy_on_request(handle)
  -- The other pools want the caller's API key too.
  local authorization = handle:headers():get("authorization")
  if authorization ~= nil then
    handle:streamInfo():dynamicMetadata():set("esm.catalogue", "authorization", authorization)
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  if headers:get(":status") ~= "200" or headers:get("grpc-status") ~= nil then
    return  -- the answering pool failed: its error goes out as it is
  end
  local body = handle:body()
  local own = models_of(body:getBytes(0, body:length()))
  body = nil  -- no longer valid once httpCall has yielded; handle:body() again below
  if own == nil then
    return
  end
  local stored = handle:streamInfo():dynamicMetadata():get("esm.catalogue")
  local authorization = stored and stored["authorization"]
  local answers = {{model = ANSWERING_MODEL, models = own}}
  for _, pool in ipairs(OTHER_POOLS) do
    answers[#answers + 1] = {model = pool.model, models = ask(handle, pool, authorization) or {}}
  end

  local chosen, names = {}, {}
  local function take(entry)
    if chosen[entry.name] == nil then
      chosen[entry.name] = entry.bytes
      names[#names + 1] = entry.name
    end
  end
  for _, answer in ipairs(answers) do  -- a model's own pool speaks for it first
    for _, entry in ipairs(answer.models) do
      if entry.name == answer.model then
        take(entry)
      end
    end
  end
  for _, answer in ipairs(answers) do  -- then models that have no pool of their own
    for _, entry in ipairs(answer.models) do
      take(entry)
    end
  end
  table.sort(names)

  local parts = {}
  for _, name in ipairs(names) do
    parts[#parts + 1] = "\10" .. write_varint(#chosen[name]) .. chosen[name]  -- field 1, length-delimited
  end
  local message = table.concat(parts)
  local n = #message
  local prefix = string.char(0, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                             math.floor(n / 256) % 256, n % 256)
  handle:body():setBytes(prefix .. message)
end
